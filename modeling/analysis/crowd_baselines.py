"""Few-shot prediction of a real worker's judgments by the two baselines that need no LLM (issue 20's
table; the model-based rows — FSPO on the real base, another worker's shots, the base model — are not
here yet).

For each worker with at least MIN_DECISIVE non-tie judgments and each shot count k, every prompt the worker
judged is held out in turn (leave one prompt out): k shots are drawn, seeded, from the worker's non-tie
judgments on the other prompts, and the worker's non-tie judgments on the held-out prompt are predicted,
so no shot shares a prompt with what it predicts. Ties are neither shots nor targets (a two-way prediction
cannot be right about a tie). A prediction that cannot choose counts as half right.

- crowd majority: the label most of the other workers gave that pair (the worker's own judgment left out);
  it does not read the shots, so its row is the same target set seen at each k;
- position/length prior: from the k shots, how often the worker chose the left response and how often the
  longer one (each smoothed as (count + 1) / (k + 2)); a held-out pair is predicted by the sum of the two
  leanings (left-ness toward the left response, length toward the longer), half right when it is 0 (k = 0).

Accuracy pools a worker's folds; its 95% interval is the project's participant bootstrap (workers resampled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .crowd import SEED, CrowdData, first_judgments
from .stats import participant_bootstrap

SHOTS = (0, 1, 2, 4, 8)
MIN_DECISIVE = 8  # non-tie judgments a worker needs to enter the table
BASELINES = ("crowd majority (other workers)", "position/length prior (k shots)")


@dataclass(frozen=True)
class BaselineRow:
    baseline: str
    shots: int
    workers: int  # workers with at least one scored fold at this k
    targets: int  # held-out judgments scored
    accuracy: float | None
    ci: tuple[float, float] | None


@dataclass(frozen=True)
class FewShotBaselines:
    rows: list[BaselineRow]
    eligible_workers: int
    min_decisive: int
    shots: tuple[int, ...]
    seed: int
    resamples: int


def _decisive(data: CrowdData) -> pd.DataFrame:
    """Every first, non-tie judgment, with the crowd's other-worker votes and the two sides' features."""
    first = first_judgments(data)
    votes = first[first["label"] != "tie"].pivot_table(
        index="unit", columns="label", values="worker", aggfunc="count", fill_value=0
    )
    votes = votes.reindex(columns=["lo", "hi"], fill_value=0)
    d = first[first["label"] != "tie"].join(votes, on="unit")
    own_lo = (d["label"] == "lo").astype(int)
    lo_votes, hi_votes = d["lo"] - own_lo, d["hi"] - (1 - own_lo)  # the other workers' votes
    lo_is_left = np.minimum(d["left_id"], d["right_id"]) == d["left_id"]
    # The crowd's prediction as "chose lo" probability: 1, 0 or 1/2 (no majority, or no other worker).
    crowd = np.where(lo_votes > hi_votes, 1.0, np.where(hi_votes > lo_votes, 0.0, 0.5))
    left_len = d["left_id"].map(data.lengths).to_numpy()
    right_len = d["right_id"].map(data.lengths).to_numpy()
    chose_left = (d["label"] == "lo").to_numpy() == lo_is_left.to_numpy()
    return pd.DataFrame(
        {
            "worker": d["worker"].to_numpy(),
            "prompt": d["question_id"].to_numpy(),
            "chose_left": chose_left,
            "longer_side": np.sign(left_len - right_len),  # +1 left longer, -1 right, 0 same
            "crowd_correct": np.where(crowd == 0.5, 0.5, (crowd == 1.0) == (d["label"] == "lo").to_numpy()),
        }
    )


def _prior_correct(shots: pd.DataFrame, targets: pd.DataFrame) -> np.ndarray:
    """The position/length prior fitted on `shots`, scored on `targets` (1, 0 or 1/2 each)."""
    k = len(shots)
    left = (shots["chose_left"].sum() + 1) / (k + 2) - 0.5
    chose_longer = ((shots["longer_side"] == 1) & shots["chose_left"]) | (
        (shots["longer_side"] == -1) & ~shots["chose_left"]
    )
    decided = int((shots["longer_side"] != 0).sum())
    longer = (chose_longer.sum() + 1) / (decided + 2) - 0.5
    lean = left + longer * targets["longer_side"].to_numpy()  # > 0: predict left
    truth = np.where(targets["chose_left"].to_numpy(), 1.0, -1.0)
    return np.where(np.isclose(lean, 0.0), 0.5, (np.sign(lean) == truth).astype(float))


def _worker_scores(rows: pd.DataFrame, k: int, rng: np.random.Generator) -> tuple[float, float, float, int]:
    """(crowd correct, prior correct, targets, folds) of one worker at k shots, over held-out prompts."""
    crowd = prior = n = 0.0
    folds = 0
    for prompt in sorted(rows["prompt"].unique()):
        targets = rows[rows["prompt"] == prompt]
        pool = rows[rows["prompt"] != prompt]
        if len(pool) < k:
            continue
        shots = pool.iloc[rng.choice(len(pool), size=k, replace=False)] if k else pool.iloc[:0]
        crowd += float(targets["crowd_correct"].sum())
        prior += float(_prior_correct(shots, targets).sum())
        n += len(targets)
        folds += 1
    return crowd, prior, n, folds


def few_shot_baselines(
    data: CrowdData, *, shots: tuple[int, ...] = SHOTS, seed: int = SEED, resamples: int = 1000
) -> FewShotBaselines:
    """Accuracy of the crowd-majority and position/length-prior baselines at each shot count (above)."""
    decisive = _decisive(data)
    counts = decisive.groupby("worker").size()
    eligible = sorted(counts[counts >= MIN_DECISIVE].index)
    rows = []
    for k in shots:
        rng = np.random.default_rng([seed, k])
        scores = np.array(
            [_worker_scores(decisive[decisive["worker"] == w], k, rng) for w in eligible], dtype=float
        ).reshape(-1, 4)
        scored = scores[scores[:, 2] > 0]
        for i, name in enumerate(BASELINES):
            acc = float(scored[:, i].sum() / scored[:, 2].sum()) if len(scored) else None
            ci = None
            if len(scored) >= 2:
                ci = participant_bootstrap(scored[:, i], scored[:, 2], seed=seed, resamples=resamples)
            rows.append(BaselineRow(name, k, len(scored), int(scored[:, 2].sum()), acc, ci))
    return FewShotBaselines(rows, len(eligible), MIN_DECISIVE, tuple(shots), seed, resamples)


def baseline_lines(b: FewShotBaselines) -> list[str]:
    """The report's few-shot table."""
    lines = [
        "## Few-shot prediction of a worker: the no-LLM baselines",
        "",
        f"{b.eligible_workers} workers with at least {b.min_decisive} non-tie judgments. Each prompt a worker "
        "judged is held out in turn; k shots are drawn (seeded) from their non-tie judgments on other "
        "prompts; their non-tie judgments on the held-out prompt are predicted (a prediction that cannot "
        f"choose counts half). 95% intervals: bootstrap over workers ({b.resamples:,} resamples, seed "
        f"{b.seed}). The model-based rows (FSPO, another worker's shots, the base model) are not run yet.",
        "",
        "| baseline | k | workers | held-out judgments | accuracy [95% CI] |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in b.rows:
        acc = "—" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        ci = "" if r.ci is None else f" [{100 * r.ci[0]:.1f}, {100 * r.ci[1]:.1f}]"
        lines.append(f"| {r.baseline} | {r.shots} | {r.workers} | {r.targets:,} | {acc}{ci} |")
    return [*lines, ""]
