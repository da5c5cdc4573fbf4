"""``fspo analyze``: the analyses of a human study from its export."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from .ui import out, progress_bar


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _ci(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f" [{100 * low:.1f}–{100 * high:.1f}]"


def _analysis_table(analysis: Any) -> Table:
    """One line per analysis: its headline numbers, or why it has none."""
    table = Table(title=f"Analyses of {analysis.study['slug']}", title_justify="left")
    for col in ("analysis", "result", "n"):
        table.add_column(col, justify="right" if col == "n" else "left")
    for rows in (_rate_rows, _consistency_rows, _shot_rows, _shift_and_description_rows):
        for row in rows(analysis):
            table.add_row(*row)
    return table


def _rate_rows(analysis: Any) -> list[tuple[str, str, str]]:
    """Each arm pair's win rate, then its synthetic-to-real transfer."""
    rows = []
    for r in analysis.win_rates.rows:
        result = r.message if r.win_rate is None else f"{_pct(r.win_rate)}{_ci(r.ci_low, r.ci_high)}"
        rows.append((f"win rate {r.arm} vs {r.baseline}", result, f"{r.n} ratings, {r.participants} people"))
    for r in analysis.transfer.rows:
        result = r.message or (
            f"synthetic {_pct(r.synthetic_win_rate)} − real {_pct(r.real_win_rate)} = {100 * r.gap:+.1f} pts"
            f"{'' if r.gap_ci is None else f' [{100 * r.gap_ci[0]:+.1f} to {100 * r.gap_ci[1]:+.1f}]'}"
        )
        rows.append((f"transfer {r.arm} vs {r.baseline}", result, str(r.synthetic_n or "")))
    return rows


def _consistency_rows(analysis: Any) -> list[tuple[str, str, str]]:
    c = analysis.consistency
    ir = c.inter_rater
    return [
        (
            "consistency on repeats",
            c.message
            or f"{_pct(c.agreement)}{_ci(c.ci_low, c.ci_high)}"
            + ("".join(f", synthetic {_pct(v)}" for _, _, v in c.synthetic[:1])),
            f"{c.repeats} repeats",
        ),
        (
            "agreement between participants",
            ir.message or f"Krippendorff's alpha {ir.alpha:.3f}",
            f"{ir.units} shared pairs",
        ),
    ]


def _shot_rows(analysis: Any) -> list[tuple[str, str, str]]:
    shots = analysis.shots
    rows = []
    if shots.message:
        rows.append(("shot-count sensitivity", shots.message, ""))
    for arm, baseline in dict.fromkeys((r.rate.arm, r.rate.baseline) for r in shots.rows):
        rates = [r for r in shots.rows if (r.rate.arm, r.rate.baseline) == (arm, baseline)]
        rows.append(
            (
                f"by shots {arm} vs {baseline}",
                ", ".join(f"N={r.shots}: {_pct(r.rate.win_rate)}" for r in rates),
                ", ".join(str(r.rate.participants) for r in rates) + " people",
            )
        )
    return rows


def _shift_and_description_rows(analysis: Any) -> list[tuple[str, str, str]]:
    shift = analysis.shift
    shift_row = (
        "distribution shift",
        shift.message
        or ", ".join(
            f"{a.survey} JSD {a.js_divergence:.3f}" for a in shift.attributes if a.js_divergence is not None
        )
        or "no survey answers",
        "",
    )
    d = analysis.descriptions
    description_row = (
        "user descriptions",
        d.message
        or (
            "texts side by side, no similarity"
            if d.mean_similarity is None
            else f"similarity {d.mean_similarity:.3f}"
            + ("" if d.mean_others is None else f" (to others {d.mean_others:.3f})")
        ),
        f"{len(d.pairs)} participants",
    )
    return [shift_row, description_row]


def analyze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fspo analyze",
        description="Analyses of a human study from its export (manage.py export or the studio's export "
        "page): win rates per arm pair, synthetic-to-real transfer, consistency, shot-count sensitivity, "
        "distribution shift, user-description quality. Writes report.md, analysis.json and PNG plots.",
    )
    p.add_argument("export_dir", type=Path, help="an export folder (schema fspo-study-export-2)")
    p.add_argument("--synthetic-eval", type=Path, help="an fspo eval results.json (or its run folder)")
    p.add_argument(
        "--synthetic-dataset",
        type=Path,
        help="the synthetic dataset of the study's domain: persona distribution and self-consistency "
        "(default: the domain's persona weights, no self-consistency)",
    )
    p.add_argument("--out", type=Path, help="where to write the report (default: EXPORT_DIR/analysis)")
    p.add_argument("--too-fast-ms", type=int, default=None, help="too-fast threshold (default: the export's)")
    p.add_argument("--keep-too-fast", action="store_true", help="do not exclude too-fast participants")
    p.add_argument(
        "--keep-failed-attention", action="store_true", help="do not exclude failed attention checks"
    )
    p.add_argument("--keep-returned", action="store_true", help="count returned and timed-out participants")
    p.add_argument("--completed-only", action="store_true", help="count only participants who completed")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument(
        "--no-embeddings", action="store_true", help="skip the MiniLM description similarities (faster)"
    )
    return p


def cmd_analyze(argv: list[str]) -> int:
    from ..analysis import (
        AnalysisOptions,
        ExclusionRules,
        analyze,
        load_export,
        read_synthetic_eval,
        synthetic_inputs,
        write_report,
    )

    args = analyze_parser().parse_args(argv)
    options = AnalysisOptions(
        rules=ExclusionRules(
            drop_returned=not args.keep_returned,
            drop_failed_attention=not args.keep_failed_attention,
            drop_too_fast=not args.keep_too_fast,
            too_fast_ms=args.too_fast_ms,
            completed_only=args.completed_only,
        ),
        seed=args.seed,
        resamples=args.resamples,
        embeddings=not args.no_embeddings,
    )
    # Everything is read and checked before anything is written.
    data = load_export(args.export_dir)
    evaluation = None
    if args.synthetic_eval is not None:
        evaluation = read_synthetic_eval(args.synthetic_eval)
    synthetic = synthetic_inputs(
        domain=str(data.study["domain"]), evaluation=evaluation, dataset=args.synthetic_dataset
    )
    analysis = analyze(data, options=options, synthetic=synthetic)
    out_dir = args.out or args.export_dir / "analysis"
    written = write_report(analysis, out_dir)
    out.print(_analysis_table(analysis))
    out.print(f"wrote {out_dir}: {', '.join(path.name for path in written)}")
    return 0


def analyze_crowd_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fspo analyze crowd",
        description="Analyses of an imported crowd (fspo data import llmfao): agreement between workers "
        "(Krippendorff's alpha, Cohen's kappa), self-consistency on repeated pairs, the crowd's majority "
        "against the GPT judges (kappa and agreement with bootstrap intervals), and the models' "
        "Bradley-Terry ranking from the crowd beside the judges'. Writes report.md, crowd.json and PNG plots.",
    )
    p.add_argument("dataset", type=Path, help="an imported crowd dataset folder")
    p.add_argument("--out", type=Path, required=True, help="where to write the report")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument(
        "--no-baselines", action="store_true", help="skip the few-shot prediction baselines (no LLM)"
    )
    p.add_argument(
        "--judge",
        help="also run the project's LLM judge (modeling.judges, both orders) on a seeded sample of pairs "
        "against the crowd: a known model's name (fspo models list), a model directory or http://.../v1#name",
    )
    p.add_argument("--judge-pairs", type=int, default=100, help="pairs the --judge is asked about")
    p.add_argument(
        "--model-arms",
        metavar="CHECKPOINT",
        help="also run the few-shot table's model rows: this FSPO (IPO) stage's implicit reward with the "
        "worker's own and another worker's shots, and the base model's log-prob (its reference and base "
        "are read from its fspo.json), on a bounded seeded sample (the --model-* flags)",
    )
    p.add_argument(
        "--model-base",
        metavar="MODEL",
        help="instead of --model-arms, only the base model's row (a model directory or a known name): "
        "for when no FSPO checkpoint is at hand",
    )
    p.add_argument("--model-workers", type=int, default=12, help="workers sampled for the model rows")
    p.add_argument("--model-folds", type=int, default=1, help="held-out prompts per sampled worker")
    p.add_argument(
        "--model-targets", type=int, default=4, help="held-out judgments per held-out prompt, at most"
    )
    p.add_argument(
        "--model-response-tokens", type=int, default=48, help="every response cut to this many tokens"
    )
    return p


def _crowd_model_rows(args: argparse.Namespace, data: Any, analysis: Any) -> None:
    from ..analysis.crowd_models import ModelArms, model_arms_from_checkpoint, model_rows
    from ..models import REGISTRY, pull

    if args.model_arms:
        arms = model_arms_from_checkpoint(args.model_arms)
    else:
        base = str(pull(args.model_base)) if args.model_base in REGISTRY else args.model_base
        arms = ModelArms(policy=None, reference=None, base=base, beta=None)
    with progress_bar("model rows") as update:
        analysis.models = model_rows(
            data,
            args.dataset,
            arms,
            seed=args.seed,
            workers=args.model_workers,
            folds=args.model_folds,
            targets=args.model_targets,
            response_tokens=args.model_response_tokens,
            resamples=args.resamples,
            progress=update,
        )


def _crowd_llm_judge(args: argparse.Namespace, data: Any, analysis: Any) -> None:
    """The --judge on --judge-pairs pairs, added to the analysis's judges (the rankings stay the GPT
    judges': a sample is too sparse for a Bradley-Terry fit)."""
    from ..analysis.crowd_judge import crowd_texts, llm_judge_agreement, llm_judge_rows
    from ..judges import LLMJudge
    from ..llm import backend_from_spec
    from ..models import REGISTRY, pull

    spec = str(pull(args.judge)) if args.judge in REGISTRY else args.judge
    judge = LLMJudge(backend_from_spec(spec))
    judge.name = f"llm:{args.judge}"
    questions, responses = crowd_texts(args.dataset)
    rows = llm_judge_rows(
        data, judge, questions=questions, responses=responses, pairs=args.judge_pairs, seed=args.seed
    )
    analysis.judges.append(llm_judge_agreement(data, rows, seed=args.seed, resamples=args.resamples))


def cmd_analyze_crowd(argv: list[str]) -> int:
    from ..analysis.crowd import analyze_crowd, load_crowd
    from ..analysis.crowd_report import write_crowd_report

    parser = analyze_crowd_parser()
    args = parser.parse_args(argv)
    if args.model_arms and args.model_base:
        parser.error("--model-arms and --model-base are alternatives: give one")
    data = load_crowd(args.dataset)
    analysis = analyze_crowd(data, seed=args.seed, resamples=args.resamples)
    if not args.no_baselines:
        from ..analysis.crowd_baselines import few_shot_baselines

        analysis.baselines = few_shot_baselines(data, seed=args.seed, resamples=args.resamples)
    if args.judge:
        _crowd_llm_judge(args, data, analysis)
    if args.model_arms or args.model_base:
        _crowd_model_rows(args, data, analysis)
    written = write_crowd_report(analysis, args.out)
    table = Table(title=f"The crowd in {args.dataset}", title_justify="left")
    for col in ("analysis", "result"):
        table.add_column(col)
    g = analysis.agreement
    table.add_row(
        "Krippendorff's alpha (ties a category / dropped)",
        f"{_num(g.alpha_with_ties)} / {_num(g.alpha_ties_dropped)}",
    )
    table.add_row(f"mean Cohen's kappa ({g.kappa_pairs} worker pairs)", _num(g.kappa_mean))
    table.add_row(
        "self-consistency", analysis.consistency.message or f"{_pct(analysis.consistency.agreement)}"
    )
    for j in analysis.judges:
        table.add_row(f"crowd vs {j.judge}: kappa, agreement", f"{_num(j.kappa)}, {_pct(j.agreement)}")
    for judge, rho in analysis.ranking.spearman.items():
        table.add_row(f"Bradley-Terry: Spearman crowd vs {judge}", _num(rho))
    out.print(table)
    out.print(f"wrote {args.out}: {', '.join(path.name for path in written)}")
    return 0
