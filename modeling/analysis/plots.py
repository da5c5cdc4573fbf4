"""The analyses' plots as PNG bytes (matplotlib, Agg), in the studio's palette. A plot is made only when
its analysis has numbers to show."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .agreement import Consistency
    from .crowd import CrowdAnalysis, Ranking
    from .population import DescriptionQuality, DistributionShift
    from .winrates import HumanWinRates, ShotSensitivity, Transfer

INK, MUTED, LINE = "#1c2330", "#5a6473", "#d9dee6"
ACCENT, ACCENT_SOFT, OK, INFO = "#2457c5", "#9db5ea", "#1e7a46", "#8a5a00"
SYNTHETIC = "#c07d10"  # the synthetic side of every plot: the studio's amber, light enough to tell apart
SERIES = (ACCENT, SYNTHETIC, OK, "#7b3fa0", "#b3261e", "#1b7f8c")
DPI = 110


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 9.5,
            "axes.edgecolor": LINE,
            "axes.labelcolor": INK,
            "axes.titlesize": 10.5,
            "axes.titleweight": "bold",
            "axes.titlelocation": "left",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "xtick.color": MUTED,
            "ytick.color": INK,
            "grid.color": "#e8ebf0",
            "legend.frameon": False,
        }
    )
    return plt


def _png(fig: Any, top: float = 1.0) -> bytes:
    """The figure as PNG bytes; `top` below 1 keeps room above the axes for a figure legend."""
    buf = io.BytesIO()
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    _pyplot().close(fig)
    return buf.getvalue()


def _percent_axis(ax: Any, axis: str = "x") -> None:
    (ax.set_xlim if axis == "x" else ax.set_ylim)(0, 100)
    ticks = [0, 25, 50, 75, 100]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks, [f"{t}%" for t in ticks])
    ax.grid(axis=axis, lw=0.8)
    ax.set_axisbelow(True)


def win_rates_plot(result: HumanWinRates) -> bytes | None:
    rows = [(r, r.win_rate) for r in result.rows if r.win_rate is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 0.9 + 0.62 * len(rows)))
    rng = np.random.default_rng(0)  # the dots' vertical jitter only
    for y, (r, rate) in enumerate(rows):
        dots = [100 * wins / n for _, wins, n in r.per_participant]
        ax.scatter(
            dots, y + rng.uniform(-0.17, 0.17, len(dots)), s=11, color=MUTED, alpha=0.45, lw=0, clip_on=False
        )
        if r.ci_low is not None and r.ci_high is not None:  # an interval has both ends or neither
            ax.plot(
                [100 * r.ci_low, 100 * r.ci_high], [y, y], color=ACCENT_SOFT, lw=7, solid_capstyle="round"
            )
        ax.plot(100 * rate, y, "o", color=ACCENT, ms=8, mec="white", mew=1.5)
        ax.annotate(f"{100 * rate:.1f}%", (100 * rate, y), xytext=(0, 9), textcoords="offset points",
                    ha="center", fontsize=8.5, color=INK)  # fmt: skip
    ax.axvline(50, color=MUTED, ls="--", lw=1)
    ax.set_yticks(range(len(rows)), [f"{r.arm} vs {r.baseline}" for r, _ in rows])
    ax.set_ylim(len(rows) - 0.5, -0.6)
    _percent_axis(ax)
    ax.set_xlabel("win rate (95% bootstrap interval over participants; dots: each participant)")
    return _png(fig)


def transfer_plot(result: Transfer) -> bytes | None:
    rows = [(r, r.synthetic_win_rate) for r in result.rows if r.synthetic_win_rate is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 1.1 + 0.75 * len(rows)))
    for y, (r, synthetic_rate) in enumerate(rows):
        points = [("synthetic users", synthetic_rate, r.synthetic_ci, SYNTHETIC, -0.13)]
        if r.real_win_rate is not None:
            points.append(("real participants", r.real_win_rate, r.real_ci, ACCENT, 0.13))
        for label, rate, ci, color, dy in points:
            if ci is not None:
                ax.plot([100 * ci[0], 100 * ci[1]], [y + dy] * 2, color=color, lw=2, alpha=0.55)
            ax.plot(
                100 * rate,
                y + dy,
                "o",
                color=color,
                ms=7,
                mec="white",
                mew=1.2,
                label=label if y == 0 else None,
            )
        if r.gap is not None:
            ax.annotate(f"gap {100 * r.gap:+.1f} pts".replace("-", "−"), (100, y), xytext=(-4, 0), textcoords="offset points",
                        ha="right", va="center", fontsize=8.5, color=MUTED)  # fmt: skip
    ax.axvline(50, color=MUTED, ls="--", lw=1)
    ax.set_yticks(range(len(rows)), [f"{r.arm} vs {r.baseline}" for r, _ in rows])
    ax.set_ylim(len(rows) - 0.5, -0.6)
    _percent_axis(ax)
    ax.set_xlabel("win rate against the same baseline (95% intervals)")
    ax.legend(loc="lower left", ncols=2, bbox_to_anchor=(0, 1.0), fontsize=8.5)
    return _png(fig)


def consistency_plot(result: Consistency) -> bytes | None:
    if result.agreement is None:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 3.0))
    values = np.array([p.agreement for p in result.participants])
    levels, counts = np.unique(np.round(values, 3), return_counts=True)
    ax.bar(100 * levels, counts, width=4.5, color=ACCENT_SOFT, edgecolor=ACCENT, lw=0.8)
    ax.axvline(
        100 * result.agreement,
        color=ACCENT,
        lw=2,
        label=f"participants, pooled: {100 * result.agreement:.1f}%",
    )
    for (key, _, value), style in zip(result.synthetic, ("--", ":"), strict=False):
        name = "synthetic, both orders" if key.startswith("order") else "synthetic, asked again"
        ax.axvline(100 * value, color=SYNTHETIC, ls=style, lw=1.6, label=f"{name}: {100 * value:.1f}%")
    _percent_axis(ax)
    ax.set_xlim(-5, 105)
    ax.grid(axis="x", visible=False)
    ax.set_xlabel("agreement on repeated pairs (sides swapped), per participant")
    ax.set_ylabel("participants")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper left", fontsize=8.5)
    return _png(fig)


def shots_plot(result: ShotSensitivity) -> bytes | None:
    pairs: dict[tuple[str, str], list[Any]] = {}
    for row in result.rows:
        if row.rate.win_rate is not None:
            pairs.setdefault((row.rate.arm, row.rate.baseline), []).append(row)
    if not pairs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 3.2))
    spread = 0.06 * (max(result.shot_counts) - min(result.shot_counts) or 1)
    for k, ((arm, baseline), rows) in enumerate(pairs.items()):
        color = SERIES[k % len(SERIES)]
        dx = (k - (len(pairs) - 1) / 2) * spread
        x = np.array([r.shots for r in rows], dtype=float) + dx
        y = np.array([100 * r.rate.win_rate for r in rows])
        ax.plot(x, y, "-o", color=color, ms=6, mec="white", label=f"{arm} vs {baseline}")
        for xi, r in zip(x, rows, strict=True):
            if r.rate.ci_low is not None:
                ax.plot([xi, xi], [100 * r.rate.ci_low, 100 * r.rate.ci_high], color=color, lw=2, alpha=0.45)
    ax.axhline(50, color=MUTED, ls="--", lw=1)
    ax.set_xticks(result.shot_counts)
    _percent_axis(ax, "y")
    ax.set_xlabel("picks per participant (N shots)")
    ax.set_ylabel("win rate (95% interval)")
    ax.legend(loc="lower right", fontsize=8.5)
    return _png(fig)


def shift_plot(result: DistributionShift) -> bytes | None:
    shown = [a for a in result.attributes if a.categories]
    if not shown:
        return None
    plt = _pyplot()
    heights = [max(2, len(a.categories)) for a in shown]
    fig, axes = plt.subplots(
        len(shown), 1, figsize=(7.2, 0.8 + 0.27 * sum(heights) + 0.5 * len(shown)),
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip
    for ax, a in zip(axes[:, 0], shown, strict=True):
        y = np.arange(len(a.categories))
        real = [100 * c.real_share for c in a.categories]
        synthetic = [100 * c.synthetic_share for c in a.categories]
        ax.barh(y - 0.2, synthetic, height=0.38, color=SYNTHETIC, alpha=0.8, label="synthetic personas")
        ax.barh(y + 0.2, real, height=0.38, color=ACCENT, label="participants")
        ax.set_yticks(y, [c.category for c in a.categories], fontsize=8.5)
        ax.invert_yaxis()
        ax.grid(axis="x", lw=0.8)
        ax.set_axisbelow(True)
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0f}%")
        jsd = "" if a.js_divergence is None else f"  ·  JSD {a.js_divergence:.3f} bits"
        ax.set_title(f"{a.survey.replace('_', ' ')} → {a.synthetic}{jsd}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncols=2, fontsize=8.5)
    axes[-1, 0].set_xlabel("share of answers / of synthetic users")
    height = fig.get_size_inches()[1]
    return _png(fig, top=1 - 0.32 / height)


def descriptions_plot(result: DescriptionQuality) -> bytes | None:
    scored = [p for p in result.pairs if p.similarity is not None and p.others_similarity is not None]
    if not scored:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    own = np.array([p.similarity for p in scored])
    others = np.array([p.others_similarity for p in scored])
    low = min(own.min(), others.min(), 0.0) - 0.05
    high = max(own.max(), others.max()) + 0.05
    ax.plot([low, high], [low, high], color=MUTED, ls="--", lw=1)
    ax.scatter(own, others, s=28, color=ACCENT, alpha=0.8, lw=0.6, edgecolor="white")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    ax.grid(lw=0.8)
    ax.set_axisbelow(True)
    ax.set_xlabel("similarity to their own self-description")
    ax.set_ylabel("similarity to others' self-descriptions")
    ax.text(high, low, "below the line: fits this participant\nbetter than the others ", ha="right",
            va="bottom", fontsize=8, color=MUTED)  # fmt: skip
    return _png(fig)


def crowd_agreement_plot(result: CrowdAnalysis) -> bytes | None:
    """Kappa and alpha between workers and between the crowd and each judge, with 95% intervals."""
    rows: list[tuple[str, float, tuple[float, float] | None, str]] = []
    a = result.agreement
    for label, value in (
        ("workers: alpha, ties a category", a.alpha_with_ties),
        ("workers: alpha, ties dropped", a.alpha_ties_dropped),
        (f"workers: mean kappa ({a.kappa_pairs} pairs)", a.kappa_mean),
    ):
        if value is not None:
            rows.append((label, value, None, ACCENT))
    for j in result.judges:
        if j.kappa is not None:
            rows.append((f"crowd vs {j.judge}: kappa", j.kappa, j.kappa_ci, SYNTHETIC))
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 0.45 * len(rows) + 1.1))
    for i, (_, value, ci, color) in enumerate(rows):
        ax.barh(i, value, color=color, alpha=0.35, edgecolor=color)
        if ci is not None:
            # A percentile interval on few pairs may leave out the estimate itself: no negative bar.
            low, high = max(0.0, value - ci[0]), max(0.0, ci[1] - value)
            ax.errorbar(value, i, xerr=[[low], [high]], color=color, capsize=3, lw=1.2)
        ax.text(max(value, ci[1] if ci else value) + 0.015, i, f"{value:.2f}", va="center", fontsize=8.5)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.6)
    ax.set_xlim(min(0.0, min(r[1] for r in rows)), 1.0)
    ax.set_xlabel("Krippendorff's alpha / Cohen's kappa (0 chance, 1 perfect; 95% CI over pairs)")
    return _png(fig)


def crowd_ranking_plot(result: Ranking) -> bytes | None:
    """The crowd's Bradley-Terry scores with bootstrap intervals, and the crowd's against each judge's."""
    if not result.models:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(10.5, 0.17 * len(result.models) + 1.5), gridspec_kw={"width_ratios": [1.4, 1]}
    )
    y = np.arange(len(result.models))
    crowd = np.array(result.crowd)
    # Percentile intervals on few judgments may leave out the estimate itself: no negative bar.
    err = np.clip([crowd - np.array(result.crowd_low), np.array(result.crowd_high) - crowd], 0, None)
    left.errorbar(crowd, y, xerr=err, fmt="o", ms=3, color=ACCENT, ecolor=ACCENT_SOFT, lw=1)
    left.set_yticks(y, result.models, fontsize=6.5)
    left.set_ylim(len(y) - 0.5, -0.5)
    left.set_xlabel("crowd Bradley-Terry score (95% bootstrap interval)")
    left.set_title("Models ranked by the crowd")
    for (judge, scores), color in zip(result.judges.items(), (SYNTHETIC, OK, *SERIES), strict=False):
        rho = result.spearman[judge]
        label = f"{judge} (Spearman {'undefined' if rho is None else f'{rho:.2f}'})"
        right.scatter(crowd, scores, s=12, color=color, label=label)
    # Log axes: a judge that almost never ties gives a few always-winning models very large scores.
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("crowd score (log)")
    right.set_ylabel("judge's Bradley-Terry score (log)")
    right.set_title("Crowd vs the GPT judges")
    right.legend(loc="upper left", fontsize=8)
    return _png(fig)
