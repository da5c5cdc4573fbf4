"""An evaluation run's files: ``generations.jsonl``, ``results.json``, ``report.md``
(``report_markdown``) and the PNG plots.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import Episode

if TYPE_CHECKING:
    from .arms import EvalResult


def _write_run(
    out: Path, eps: Sequence[Episode], texts: dict[str, list[str]], result: EvalResult, meta: dict[str, Any]
) -> None:
    """generations.jsonl, results.json, report.md and the plots."""
    with open(out / "generations.jsonl", "w") as f:
        for k, e in enumerate(eps):
            f.write(
                json.dumps({"user_id": e.user_id, "question": e.question, **{a: texts[a][k] for a in texts}})
                + "\n"
            )
    results = {
        **meta,
        "table": result.table,
        "shot_sweep": result.shot_sweep,
        "head_to_head": result.head_to_head,
        "by_structure": result.by_structure,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(result, meta))
    _plots(result, meta["baseline"], out)


def report_markdown(result: EvalResult, meta: dict[str, Any]) -> str:
    t = meta.get("temperature", 0.0)
    decoding = f"sampled at temperature {t}" if t else "greedy"
    lines = [
        "# FSPO evaluation on held-out synthetic users",
        "",
        f"Dataset `{meta['dataset']}`; {meta['episodes']} episodes ({meta['split']}); {meta['shots']} shots; "
        f"decoding: {decoding}; judge: {meta['judge']}; win rate against `{meta['baseline']}`, ties counted as halves, 95% bootstrap interval; "
        "p: one-sided binomial test of win rate > 50%.",
        "",
        "| arm | context | CoT | win rate vs base | 95% CI | p | mean oracle score |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for r in result.table:
        p = "—" if r.get("p_value") is None else f"{r['p_value']:.3g}"
        score = f"{r['mean_oracle_score']:.3f}" if "mean_oracle_score" in r else "—"
        lines.append(
            f"| {r['arm']} | {r['context']} | {'yes' if r['cot'] else ''} | {100 * r['win_rate']:.1f}% | "
            f"{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f} | {p} | {score} |"
        )
    cut = [r for r in result.table if r.get("prompts_cut")]
    if cut:
        lines += [
            "",
            "Prompts too long for the model's context dropped their earliest shots: "
            + "; ".join(f"`{r['arm']}` {r['prompts_cut']} prompts ({r['shots_cut']} shots)" for r in cut)
            + ".",
        ]
    if result.shot_sweep:
        lines += ["", "## Shot-count sensitivity", "", "| shots | win rate | 95% CI |", "|---:|---:|---|"]
        lines += [
            f"| {r['shots']} | {100 * r['win_rate']:.1f}% | {100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f} |"
            for r in result.shot_sweep
        ]
    if result.head_to_head:
        lines += [
            "",
            "## Head to head",
            "",
            "Each pair's answers to the same episodes, judged against each other.",
            "",
            "| arm | vs | win rate | 95% CI | p | ties |",
            "|---|---|---:|---|---:|---:|",
        ]
        lines += [
            f"| {r['arm']} | {r['vs']} | {100 * r['win_rate']:.1f}% | "
            f"{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f} | {r['p_value']:.3g} | {int(r['ties'])} |"
            for r in result.head_to_head
        ]
    lines += _structure_lines(result.by_structure)
    lines += ["", "![win rates](win_rates.png)"] + (
        ["", "![shot sweep](shot_sweep.png)"] if result.shot_sweep else []
    )
    return "\n".join(lines) + "\n"


def _structure_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The per-structure section of the report (none for a dataset without a structure mix)."""
    if not rows:
        return []
    lines = [
        "",
        "## Per preference structure",
        "",
        "The comparisons above, grouped by the structure of the episode's user (held out: no training "
        "user has it).",
        "",
        "| arm | structure | held out | episodes | win rate | 95% CI | p |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    lines += [
        f"| {r['arm']} | {r['structure']} | {'yes' if r['held_out'] else ''} | {int(r['n'])} | "
        f"{100 * r['win_rate']:.1f}% | {100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f} | {r['p_value']:.3g} |"
        for r in rows
    ]
    return lines


def _plots(result: EvalResult, baseline: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.table if r["arm"] != baseline]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(1, len(rows))))
    y = np.arange(len(rows))
    wr = np.array([r["win_rate"] for r in rows]) * 100
    err = (
        np.array([[r["win_rate"] - r["ci_low"], r["ci_high"] - r["win_rate"]] for r in rows]).T * 100
        if rows
        else None
    )
    ax.barh(y, wr, xerr=err, color="#4C72B0", capsize=3)
    ax.axvline(50, color="grey", ls="--", lw=1)
    ax.set_yticks(y, [r["arm"] for r in rows])
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"win rate vs {baseline} (%)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "win_rates.png", dpi=120)
    plt.close(fig)
    if result.shot_sweep:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        n = [r["shots"] for r in result.shot_sweep]
        w = np.array([r["win_rate"] for r in result.shot_sweep]) * 100
        lo = np.array([r["ci_low"] for r in result.shot_sweep]) * 100
        hi = np.array([r["ci_high"] for r in result.shot_sweep]) * 100
        ax.plot(n, w, marker="o")
        ax.fill_between(n, lo, hi, alpha=0.2)
        ax.axhline(50, color="grey", ls="--", lw=1)
        ax.set_xlabel("few-shot pairs in the prompt (N)")
        ax.set_ylabel(f"win rate vs {baseline} (%)")
        ax.set_ylim(0, 100)
        fig.tight_layout()
        fig.savefig(out / "shot_sweep.png", dpi=120)
        plt.close(fig)
