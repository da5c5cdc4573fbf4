"""The model-based rows of issue 20's few-shot table: does a model given k of a real worker's judgments
predict their held-out judgments?

On the held-out splits of ``crowd_baselines.few_shot_folds`` (the same folds, the same drawn shots), each
target pair (the worker's non-tie judgment of two responses to the held-out prompt) is predicted by:

- **FSPO (own shots)**: the FSPO checkpoint's implicit reward, r(y) = beta * (log pi(y | x) - log
  pi_ref(y | x)), of the left and the right response given the worker's k shots and the prompt (x); the
  response with the larger reward is the prediction. pi is the FSPO (IPO) stage, pi_ref its reference:
  the stage it was trained from (its manifest's ``init``, the Pref-FT stage), as in training;
- **FSPO (another worker's shots)**: the same, with k shots of the next sampled worker (drawn, seeded, from
  their non-tie judgments on prompts other than the held-out one): what the shots' owner adds;
- **base model (own shots)**: log p(y | x) of the base model the stages started from.

A margin of exactly 0 counts half right. The log-probs are the project's one scorer
(``modeling.evaluate.probes.pair_logps`` over ``modeling.losses.packed_group_logps``: a fold's targets
share its prompt, encoded once).

What is bounded, so that the table runs on a CPU (every bound a parameter, recorded in the result): a
seeded sample of ``workers`` of the eligible workers, ``folds`` held-out prompts per worker (the same
prompts at every k, when the worker has that many shots elsewhere), at most ``targets`` held-out
judgments per fold, and every response (shots and targets) cut to its first ``response_tokens`` tokens.
The two no-LLM baselines are scored on the same sampled folds, so the rows compare like with like.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data import Episode, Pair
from .crowd import SEED, AnalysisInputError, CrowdData
from .crowd_baselines import (
    BASELINES,
    SHOTS,
    BaselineRow,
    Fold,
    accuracy_row,
    accuracy_table,
    baseline_correct,
    decisive_judgments,
    eligible_workers,
    few_shot_folds,
)

Progress = Callable[[int, int, str], None]

# The FSPO prompt's instruction for a crowd worker: the crowd judged which response is better.
INSTRUCTION = "Answer the question with the response this user would judge the better one."
FSPO_OWN = "FSPO implicit reward (own shots)"
FSPO_OTHER = "FSPO implicit reward (another worker's shots)"
BASE_OWN = "base model log-prob (own shots)"
MODEL_ROWS = (FSPO_OWN, FSPO_OTHER, BASE_OWN)
WORKERS = 12
FOLDS = 1
TARGETS = 4
RESPONSE_TOKENS = 48


@dataclass(frozen=True)
class ModelArms:
    """The three models of the rows: the FSPO policy, its reference, the base; beta of the FSPO stage.
    Without a policy (None: no FSPO checkpoint at hand) only the base model's row is run."""

    policy: str | None
    reference: str | None
    base: str
    beta: float | None


def model_arms_from_checkpoint(checkpoint: str | Path) -> ModelArms:
    """The FSPO (IPO or DPO) stage's checkpoint, its reference (the manifest's ``init``) and the base
    model that reference was trained from (its own manifest's ``init``, or the reference itself when it
    is a plain model directory). AnalysisInputError when the checkpoint is not a preference stage."""
    from ..data import CheckpointError
    from ..train import load_checkpoint_manifest

    try:
        config = load_checkpoint_manifest(checkpoint).get("config") or {}
    except CheckpointError as e:
        raise AnalysisInputError(str(e)) from None
    if config.get("stage") not in ("ipo", "dpo") or not config.get("init"):
        raise AnalysisInputError(
            f"{checkpoint}: the implicit reward needs a preference stage (ipo or dpo) trained from a "
            f"reference (init), not stage {config.get('stage')!r} with init {config.get('init')!r}"
        )
    reference = str(config["init"])
    if not Path(reference).is_dir():
        raise AnalysisInputError(f"{checkpoint}: its reference {reference} is not a directory")
    try:
        base = load_checkpoint_manifest(reference).get("config", {}).get("init") or reference
    except CheckpointError:
        base = reference  # a plain model directory (no fspo.json): the reference is the base
    return ModelArms(str(Path(checkpoint).resolve()), reference, str(base), float(config["beta"]))


@dataclass(frozen=True)
class SampledFold:
    fold: Fold
    other_worker: Any
    other_shots: tuple[Any, ...]
    targets: tuple[Any, ...]  # the fold's targets, at most `targets` of them


def sample_folds(
    decisive: pd.DataFrame,
    *,
    shots: tuple[int, ...],
    seed: int,
    workers: int,
    folds: int,
    targets: int,
) -> list[SampledFold]:
    """The bounded sample (module docstring): per k, the sampled workers' folds on their sampled prompts,
    each with another worker's k shots off the held-out prompt."""
    eligible = eligible_workers(decisive)
    if len(eligible) < 2:
        raise AnalysisInputError(
            "the model rows need at least two eligible workers (one lends the other shots)"
        )
    rng = np.random.default_rng([seed, 1])
    chosen = [
        eligible[i]
        for i in sorted(rng.choice(len(eligible), size=min(workers, len(eligible)), replace=False))
    ]
    prompts = {}
    for w in chosen:
        judged = sorted(decisive.loc[decisive["worker"] == w, "prompt"].unique())
        prompts[w] = set(rng.choice(judged, size=min(folds, len(judged)), replace=False).tolist())
    lender = {w: chosen[(i + 1) % len(chosen)] for i, w in enumerate(chosen)}
    out = []
    for k in shots:
        other_rng = np.random.default_rng([seed, k, 2])
        # All eligible workers' folds, as the baselines draw them, then the sample's: the same shots.
        for fold in few_shot_folds(decisive, eligible, k, seed=seed):
            if fold.worker not in prompts or fold.prompt not in prompts[fold.worker]:
                continue
            other = lender[fold.worker]
            pool = decisive[(decisive["worker"] == other) & (decisive["prompt"] != fold.prompt)]
            if len(pool) < k:
                continue
            picked = pool.index[other_rng.choice(len(pool), size=k, replace=False)] if k else pool.index[:0]
            out.append(SampledFold(fold, other, tuple(picked), fold.targets[:targets]))
    return out


def cut_responses(texts: dict[int, str], tok: Any, budget: int) -> dict[int, str]:
    """Each response's first `budget` tokens (decoded back to text)."""
    return {
        i: tok.decode(tok(t, add_special_tokens=False)["input_ids"][:budget], skip_special_tokens=True)
        for i, t in texts.items()
    }


def fold_episodes(
    decisive: pd.DataFrame,
    sampled: list[SampledFold],
    *,
    questions: dict[int, str],
    responses: dict[int, str],
) -> tuple[list[Episode], list[Episode]]:
    """Per target of each sampled fold, in order: the episode with the worker's own shots and the one
    with the lending worker's shots (the target's chosen/rejected are its left/right response)."""

    def shot_pairs(index: tuple[Any, ...]) -> tuple[Pair, ...]:
        pairs = []
        for _, row in decisive.loc[list(index)].iterrows():
            won, lost = (row.left_id, row.right_id) if row.chose_left else (row.right_id, row.left_id)
            pairs.append(Pair(questions[int(row.prompt)], responses[int(won)], responses[int(lost)]))
        return tuple(pairs)

    own, other = [], []
    for s in sampled:
        own_shots, lent = shot_pairs(s.fold.shots), shot_pairs(s.other_shots)
        for _, row in decisive.loc[list(s.targets)].iterrows():
            ep = Episode(
                instruction=INSTRUCTION,
                shots=own_shots,
                question=questions[int(row.prompt)],
                chosen=responses[int(row.left_id)],
                rejected=responses[int(row.right_id)],
                user_id=str(row.worker),
                domain="llmfao",
            )
            own.append(ep)
            other.append(dataclasses.replace(ep, shots=lent))
    return own, other


@dataclass(frozen=True)
class ModelTable:
    """The bounded table: the model rows and the two baselines on the same sampled folds."""

    rows: list[BaselineRow]
    arms: ModelArms
    workers: int
    folds: int
    targets: int
    response_tokens: int
    shots: tuple[int, ...]
    seed: int
    resamples: int
    notes: list[str] = field(default_factory=list)


def row_margins(
    arms: ModelArms,
    own: list[Episode],
    other: list[Episode],
    dataset: str,
    budget: int,
    progress: Progress | None,
) -> dict[str, np.ndarray]:
    """Each model row's left-minus-right margin per target."""
    from ..evaluate.probes import pair_logps
    from ..train import TrainConfig, load_model

    logps: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    plan = [("policy", own), ("policy", other), ("reference", own), ("reference", other), ("base", own)]
    if arms.policy is None or arms.reference is None or arms.beta is None:
        plan = plan[-1:]  # the base model's row alone
    for i, (which, episodes) in enumerate(plan):
        path = getattr(arms, which)
        if i == 0 or plan[i - 1][0] != which:
            model, tok = load_model(path)
            model.eval()
            cfg = TrainConfig(dataset=dataset, out_dir="unused", init=path, max_target_tokens=budget + 1)
        if progress:
            progress(i, len(plan), f"scoring {which} ({len(episodes)} pairs)")
        logps[which, "own" if episodes is own else "other"] = pair_logps(model, tok, episodes, cfg)
    if progress:
        progress(len(plan), len(plan), "scored")

    base_left, base_right = logps["base", "own"]
    margins = {BASE_OWN: base_left - base_right}
    if arms.beta is None:
        return margins

    def reward_margin(shots: str) -> np.ndarray:
        assert arms.beta is not None
        (pl, pr), (rl, rr) = logps["policy", shots], logps["reference", shots]
        return arms.beta * (pl - rl) - arms.beta * (pr - rr)  # r(left) - r(right), r = beta log(pi/ref)

    return {FSPO_OWN: reward_margin("own"), FSPO_OTHER: reward_margin("other"), **margins}


def model_rows(
    data: CrowdData,
    dataset: str | Path,
    arms: ModelArms,
    *,
    shots: tuple[int, ...] = SHOTS,
    seed: int = SEED,
    workers: int = WORKERS,
    folds: int = FOLDS,
    targets: int = TARGETS,
    response_tokens: int = RESPONSE_TOKENS,
    resamples: int = 1000,
    progress: Progress | None = None,
) -> ModelTable:
    """The model rows and the baselines on the same bounded sample of folds (module docstring)."""
    from transformers import AutoTokenizer

    from .crowd_judge import crowd_texts

    if min(workers, folds, targets, response_tokens) < 1:
        raise ValueError("workers, folds, targets and response_tokens must each be 1 or more")
    decisive = decisive_judgments(data)
    sampled = sample_folds(decisive, shots=shots, seed=seed, workers=workers, folds=folds, targets=targets)
    questions, responses = crowd_texts(dataset)
    tok = AutoTokenizer.from_pretrained(arms.base)
    own, other = fold_episodes(
        decisive, sampled, questions=questions, responses=cut_responses(responses, tok, response_tokens)
    )
    margins = row_margins(arms, own, other, str(dataset), response_tokens, progress)
    truth = np.array([decisive.at[t, "chose_left"] for s in sampled for t in s.targets])
    per_row: dict[str, np.ndarray] = {
        name: np.where(m == 0, 0.5, ((m > 0) == truth).astype(float)) for name, m in margins.items()
    }
    at = 0
    scored: dict[tuple[str, int], dict[Any, list[float]]] = {}
    for s in sampled:
        n = len(s.targets)
        row_scores = {name: v[at : at + n] for name, v in per_row.items()}
        narrowed = dataclasses.replace(s.fold, targets=s.targets)
        row_scores.update(baseline_correct(decisive, narrowed))
        for name, v in row_scores.items():
            scored.setdefault((name, s.fold.k), {}).setdefault(s.fold.worker, []).extend(v.tolist())
        at += n
    rows = [
        accuracy_row(name, k, scored.get((name, k), {}), seed=seed, resamples=resamples)
        for k in shots
        for name in (*BASELINES, *(r for r in MODEL_ROWS if r in margins))
    ]
    return ModelTable(rows, arms, workers, folds, targets, response_tokens, tuple(shots), seed, resamples)


def model_lines(t: ModelTable) -> list[str]:
    """The report's section for the model rows."""
    lines = [
        "## Few-shot prediction of a worker: the model rows",
        "",
        (
            f"FSPO checkpoint {t.arms.policy} (reference {t.arms.reference}, beta {t.arms.beta}); "
            if t.arms.policy
            else "No FSPO checkpoint (the base model's row only); "
        )
        + "base model "
        f"{t.arms.base}. Bounded sample (seed {t.seed}): {t.workers} workers, {t.folds} held-out prompt(s) "
        f"each, at most {t.targets} held-out judgments per prompt, every response cut to {t.response_tokens} "
        "tokens; the same folds and shots as the baselines, which are scored here on the same sample. "
        f"95% intervals: bootstrap over workers ({t.resamples:,} resamples).",
        "",
    ]
    return [*lines, *accuracy_table(t.rows, "predictor"), ""]
