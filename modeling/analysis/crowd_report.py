"""The crowd analyses' output (`fspo analyze crowd`): report.md, crowd.json and the PNG plots."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .crowd import CrowdAnalysis, Ranking
from .plots import crowd_agreement_plot, crowd_ranking_plot
from .report import _clean, write_files

CROWD_REPORT = "report.md"
CROWD_JSON = "crowd.json"
CROWD_FORMAT = "fspo-crowd-analysis/1"
TOP = 10  # models listed in the report's ranking table (all of them are in crowd.json)


def _num(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _ci(ci: tuple[float, float] | None, digits: int = 3) -> str:
    return "" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _pct(v: float | None, ci: tuple[float, float] | None = None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.1f}%" + ("" if ci is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")


def _rho(rho: float | None, p: float | None) -> str:
    return "undefined (one side constant)" if rho is None or p is None else f"{rho:.3f} (p = {p:.1e})"


def _agreement_lines(a: CrowdAnalysis) -> list[str]:
    g = a.agreement
    return [
        "## Agreement between workers",
        "",
        f"{g.units:,} pairs judged by two or more workers ({g.judgments:,} judgments by {g.workers} workers; "
        "each worker's first judgment of a pair). A judgment is coded by the response chosen, or tie.",
        "",
        "| measure | value |",
        "| --- | ---: |",
        f"| Krippendorff's alpha (nominal; ties a third category) | {_num(g.alpha_with_ties)} |",
        f"| Krippendorff's alpha (ties dropped: a tie is a missing value) | {_num(g.alpha_ties_dropped)} |",
        f"| observed agreement (pairs of judgments of a pair that agree; ties a category) | {_pct(g.observed_agreement)} |",
        f"| mean Cohen's kappa, worker pairs sharing ≥ {g.min_shared} pairs ({g.kappa_pairs} pairs) | {_num(g.kappa_mean)} |",
        f"| the same, ties dropped ({g.kappa_ties_dropped_pairs} pairs sharing ≥ {g.min_shared} decisive judgments) | {_num(g.kappa_ties_dropped_mean)} |",
        "",
        f"Worker pairs whose kappa is undefined (one same label throughout): {g.kappa_undefined}.",
        "",
        "## Self-consistency",
        "",
        a.consistency.message
        or f"{a.consistency.repeats} repeats by {a.consistency.workers} workers: the same answer "
        f"{_pct(a.consistency.agreement)} of the time.",
        "",
    ]  # fmt: skip


def _judge_lines(a: CrowdAnalysis) -> list[str]:
    v = a.verdicts
    lines = [
        "## The crowd against the judges",
        "",
        "The crowd's verdict on a pair is the label with the most votes (each worker's first judgment); "
        f"when the two responses share the most votes the crowd is split and its verdict is tie. Verdicts: "
        f"{v['decisive']:,} decisive, {v['tie_by_vote']:,} tie by vote, {v['split']:,} split. Intervals: "
        f"percentile bootstrap over pairs, {a.resamples:,} resamples, seed {a.seed}.",
        "",
        "| judge | pairs | Cohen's kappa (3 labels) | raw agreement | pairs neither calls a tie | agreement there | judge's ties |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for j in a.judges:
        lines.append(
            f"| {j.judge} | {j.pairs:,} | {_num(j.kappa)}{_ci(j.kappa_ci)} | {_pct(j.agreement, j.agreement_ci)} "
            f"| {j.decisive_pairs:,} | {_pct(j.decisive_agreement, j.decisive_agreement_ci)} | {j.judge_ties} |"
        )
    if any(j.judge.startswith("llm:") for j in a.judges):
        lines += [
            "",
            "An `llm:` judge is the project's own (modeling.judges.LLMJudge, as `fspo eval --judge` runs it): "
            "asked in both orders on a seeded sample of pairs, shown no user description.",
        ]
    return [*lines, ""]


def _score(v: float | None) -> float:
    return float("-inf") if v is None or v != v else v  # a model the judge never saw (NaN) ranks last


def judge_ranks(r: Ranking) -> dict[str, dict[str, int]]:
    """Each judge's rank (1 = best) of each model, from its own Bradley-Terry scores."""
    rank = {}
    for judge, scores in r.judges.items():
        order = sorted(range(len(r.models)), key=lambda i: -_score(scores[i]))
        rank[judge] = {r.models[i]: place + 1 for place, i in enumerate(order)}
    return rank


def _ranking_lines(a: CrowdAnalysis) -> list[str]:
    r = a.ranking
    judges = list(r.judges)
    rank = judge_ranks(r)
    lines = [
        "## Bradley–Terry ranking of the models",
        "",
        f"Bradley–Terry scores (evalica; a tie is half a win to each side) from {r.judgments:,} crowd "
        f"judgments of {len(r.models)} models, with percentile bootstrap intervals resampling judgments "
        f"({a.resamples:,} resamples, seed {a.seed}); each judge's scores from its own judgments of the same "
        "pairs. Spearman's rho between the crowd's scores and "
        + ", ".join(f"{j}'s: {_rho(r.spearman[j], r.spearman_p[j])}" for j in judges)
        + ".",
        "",
        "| crowd rank | model | crowd score [95% CI] | " + " | ".join(f"{j} rank" for j in judges) + " |",
        "| ---: | --- | ---: | " + " | ".join("---:" for _ in judges) + " |",
    ]
    for i, m in enumerate(r.models[:TOP]):
        lines.append(
            f"| {i + 1} | {m} | {r.crowd[i]:.2f} [{r.crowd_low[i]:.2f}, {r.crowd_high[i]:.2f}] | "
            + " | ".join(str(rank[j][m]) for j in judges)
            + " |"
        )
    return [*lines, "", f"The first {TOP} of {len(r.models)}; every model is in {CROWD_JSON}.", ""]


def crowd_report_markdown(a: CrowdAnalysis, figures: set[str]) -> str:
    lines = [
        "# The crowd: agreement, judges and rankings",
        "",
        f"Data: {a.source} — {a.judgments:,} judgments ({a.ties:,} ties) by {a.workers} workers of "
        f"{a.pairs:,} pairs.",
        "",
        *_agreement_lines(a),
        *_judge_lines(a),
        *_ranking_lines(a),
    ]
    if a.baselines is not None:
        from .crowd_baselines import baseline_lines

        lines += baseline_lines(a.baselines)
    if a.models is not None:
        from .crowd_models import model_lines

        lines += model_lines(a.models)
    lines += [f"![{name}]({name})" for name in sorted(figures)]
    if a.attribution:
        lines += ["", "## Attribution", "", f"{a.attribution} License: {a.license}.", ""]
    return "\n".join(lines) + "\n"


def crowd_report_files(a: CrowdAnalysis) -> dict[str, bytes]:
    """report.md, crowd.json and the plots, by file name."""
    made = {
        "crowd-agreement.png": crowd_agreement_plot(a),
        "crowd-ranking.png": crowd_ranking_plot(a.ranking),
    }
    figures = {name: png for name, png in made.items() if png is not None}
    payload: dict[str, Any] = {"format": CROWD_FORMAT, **_clean(a.to_json())}
    return {
        CROWD_REPORT: crowd_report_markdown(a, set(figures)).encode(),
        CROWD_JSON: (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode(),
        **figures,
    }


def write_crowd_report(a: CrowdAnalysis, out_dir: str | Path) -> list[Path]:
    """Write report.md, crowd.json and the PNG plots into `out_dir` (created if needed)."""
    return write_files(crowd_report_files(a), out_dir)


Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class CrowdReportRun:
    """What crowd_report_from_source wrote: the analysis and the files, in `out_dir`."""

    analysis: CrowdAnalysis
    out_dir: Path
    files: list[Path]


def crowd_report_from_source(
    source: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    resamples: int = 1000,
    baselines: bool = True,
    progress: Progress | None = None,
) -> CrowdReportRun:
    """The LLMFAO folder `source` imported (modeling.llmfao, into a temporary folder) and analysed as
    `fspo data import llmfao` then `fspo analyze crowd` (no LLM judge, no model rows) do: report.md,
    crowd.json and the plots written into `out_dir`. `progress(done, total, stage)` after each step.
    LLMFAOError (a DatasetError) when `source` is not LLMFAO's files."""
    from ..llmfao import import_llmfao
    from .crowd import analyze_crowd, load_crowd

    report = progress or (lambda done, total, stage: None)
    total = 4 if baselines else 3
    with tempfile.TemporaryDirectory(prefix="llmfao-") as tmp:
        report(0, total, "importing the LLMFAO files")
        import_llmfao(source, Path(tmp) / "llmfao")
        data = load_crowd(Path(tmp) / "llmfao")
    report(1, total, "agreement, judges and rankings")
    analysis = analyze_crowd(data, seed=seed, resamples=resamples)
    if baselines:
        from .crowd_baselines import few_shot_baselines

        report(2, total, "few-shot baselines")
        analysis.baselines = few_shot_baselines(data, seed=seed, resamples=resamples)
    report(total - 1, total, "writing the report")
    files = write_crowd_report(analysis, out_dir)
    report(total, total, "done")
    return CrowdReportRun(analysis=analysis, out_dir=Path(out_dir), files=files)
