"""Few-shot prediction of a real worker's judgments: the held-out splits (``few_shot_folds``, shared with
the model-based rows of ``modeling.analysis.crowd_models``) and the two baselines that need no LLM.

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


def decisive_judgments(data: CrowdData) -> pd.DataFrame:
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
            "judgment": d["judgment"].to_numpy(),
            "worker": d["worker"].to_numpy(),
            "prompt": d["question_id"].to_numpy(),
            "left_id": d["left_id"].to_numpy(),
            "right_id": d["right_id"].to_numpy(),
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


@dataclass(frozen=True)
class Fold:
    """One held-out split: a worker's non-tie judgments on one prompt (``targets``) predicted from ``k``
    of their non-tie judgments on other prompts (``shots``); both are index labels of the
    ``decisive_judgments`` frame."""

    worker: Any
    k: int
    prompt: int
    shots: tuple[Any, ...]
    targets: tuple[Any, ...]


def few_shot_folds(decisive: pd.DataFrame, workers: list[Any], k: int, *, seed: int = SEED) -> list[Fold]:
    """Every worker's leave-one-prompt-out folds at k shots, in worker then prompt order. The shots are
    drawn from one generator seeded (seed, k), so the folds at a k are the same for every predictor
    (the baselines here, the model rows of crowd_models); a prompt whose worker has fewer than k
    judgments elsewhere is no fold."""
    rng = np.random.default_rng([seed, k])
    folds = []
    for w in workers:
        rows = decisive[decisive["worker"] == w]
        for prompt in sorted(rows["prompt"].unique()):
            targets = rows[rows["prompt"] == prompt]
            pool = rows[rows["prompt"] != prompt]
            if len(pool) < k:
                continue
            shots = pool.iloc[rng.choice(len(pool), size=k, replace=False)] if k else pool.iloc[:0]
            folds.append(Fold(w, k, int(prompt), tuple(shots.index), tuple(targets.index)))
    return folds


def eligible_workers(decisive: pd.DataFrame) -> list[Any]:
    """Workers with at least MIN_DECISIVE non-tie judgments, sorted."""
    counts = decisive.groupby("worker").size()
    return sorted(counts[counts >= MIN_DECISIVE].index)


def baseline_correct(decisive: pd.DataFrame, fold: Fold) -> dict[str, np.ndarray]:
    """Each baseline's score (1, 0 or 1/2) on each of the fold's targets, by baseline name."""
    targets = decisive.loc[list(fold.targets)]
    return {
        BASELINES[0]: targets["crowd_correct"].to_numpy(dtype=float),
        BASELINES[1]: _prior_correct(decisive.loc[list(fold.shots)], targets),
    }


def accuracy_row(
    name: str, k: int, per_worker: dict[Any, list[float]], *, seed: int, resamples: int
) -> BaselineRow:
    """A table row: accuracy pooled over the workers' scored targets, with the workers' bootstrap
    interval (``per_worker``: each worker's scores, 1, 0 or 1/2 per target)."""
    scored = [(sum(v), len(v)) for v in per_worker.values() if v]
    sums = np.array([s for s, _ in scored], dtype=float)
    counts = np.array([n for _, n in scored], dtype=float)
    acc = float(sums.sum() / counts.sum()) if len(scored) else None
    ci = participant_bootstrap(sums, counts, seed=seed, resamples=resamples) if len(scored) >= 2 else None
    return BaselineRow(name, k, len(scored), int(counts.sum()), acc, ci)


def few_shot_baselines(
    data: CrowdData, *, shots: tuple[int, ...] = SHOTS, seed: int = SEED, resamples: int = 1000
) -> FewShotBaselines:
    """Accuracy of the crowd-majority and position/length-prior baselines at each shot count (above)."""
    decisive = decisive_judgments(data)
    eligible = eligible_workers(decisive)
    rows = []
    for k in shots:
        scores: dict[str, dict[Any, list[float]]] = {name: {} for name in BASELINES}
        for fold in few_shot_folds(decisive, eligible, k, seed=seed):
            for name, correct in baseline_correct(decisive, fold).items():
                scores[name].setdefault(fold.worker, []).extend(correct.tolist())
        rows += [accuracy_row(name, k, scores[name], seed=seed, resamples=resamples) for name in BASELINES]
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
        f"{b.seed}). The model rows (FSPO, another worker's shots, the base model) are in the next section "
        "when run (--model-arms).",
        "",
    ]
    return [*lines, *accuracy_table(b.rows, "baseline"), ""]


def accuracy_table(rows: Sequence[Any], first: str) -> list[str]:
    """The Markdown table of few-shot accuracy rows (``accuracy_row``'s), headed `first` | k | ...; the
    baselines' and the model rows' (crowd_models) alike."""
    lines = [
        f"| {first} | k | workers | held-out judgments | accuracy [95% CI] |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        acc = "—" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        ci = "" if r.ci is None else f" [{100 * r.ci[0]:.1f}, {100 * r.ci[1]:.1f}]"
        lines.append(f"| {r.baseline} | {r.shots} | {r.workers} | {r.targets:,} | {acc}{ci} |")
    return lines
