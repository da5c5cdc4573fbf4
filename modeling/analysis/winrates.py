"""Win rates on real participants: per arm pair, against the number of shots N, and beside the same
checkpoints' win rate on held-out synthetic users (`fspo eval`).

Scoring (declared in every result's rules): each counted A/B rating scores 1 when the comparison's arm
was chosen and 0 when its baseline was; a pair whose two responses are the same text scores 1/2 (a tie:
whatever was chosen, neither response was better), and ties count as halves. Attention checks and
consistency repeats are not counted (the repeat is for consistency; the first answer counts). The win
rate itself, its interval over participants and its sign test are modeling.winrate's, which the
studio's live dashboard uses too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from ..winrate import rating_scores, win_rate
from .data import AnalysisInputError, StudyArm, StudyData
from .rules import Selection
from .stats import (
    CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    normal_gap_interval,
)

SCORING = (
    "A rating scores 1 when the arm's response was chosen, 0 when the baseline's was, 1/2 when both "
    "responses are the same text (a tie); ties count as halves. Attention checks and consistency repeats "
    "are not counted."
)
INTERVAL = (
    "95% interval: percentile bootstrap over participants ({resamples:,} resamples, seed {seed}); "
    "p: binomial sign test of the decisive ratings (ties left out) against 50%, one-sided (arm > 50%, "
    "the paper's test) and two-sided."
)


@dataclass(frozen=True)
class WinRate:
    """One arm pair's win rate. `wins` counts ties as halves; `n` ratings from `participants` people;
    `per_participant` holds (pseudonym, wins, n). `message` says why a number is missing."""

    arm: str
    baseline: str
    participants: int = 0
    n: int = 0
    wins: float = 0.0
    ties: int = 0
    win_rate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_greater: float | None = None
    p_two_sided: float | None = None
    per_participant: tuple[tuple[str, float, int], ...] = ()
    message: str | None = None


@dataclass(frozen=True)
class HumanWinRates:
    rows: list[WinRate]
    rules: list[str]
    notes: list[str] = field(default_factory=list)
    message: str | None = None
    title: str = "Human win rate per arm pair"


def _same_text(data: StudyData, ratings: pd.DataFrame) -> pd.Series:
    if data.responses is None:
        return pd.Series(False, index=ratings.index)
    text = dict(zip(data.responses["response_id"], data.responses["text"], strict=True))
    left = ratings["left_response_id"].map(text)
    right = ratings["right_response_id"].map(text)
    return (left.notna() & (left == right)).astype(bool)


def counted_ratings(data: StudyData, selection: Selection) -> tuple[pd.DataFrame, list[str]]:
    """The ratings the win rates count, each with its `score`, and notes on what was left out."""
    j = data.judgments
    ratings = j[
        (j["kind"] == "rating")
        & ~j["is_attention_check"].fillna(False).astype(bool)
        & ~j["is_repeat"].fillna(False).astype(bool)
    ]
    ratings = ratings[ratings["participant"].isin(selection.included)]
    notes = []
    if data.responses is None:
        notes.append("The export has no responses table: pairs of identical responses cannot be found.")
    unassigned = ratings["arm"].isna()
    if unassigned.any():
        notes.append(
            f"{int(unassigned.sum())} rating(s) of arm pairs that are no comparison of the study were left out."
        )
    ratings = ratings[~unassigned].copy()
    ratings["score"] = rating_scores(
        ratings["arm_won"].to_numpy(dtype=bool), _same_text(data, ratings).to_numpy()
    )
    return ratings, notes


def _win_rate(
    arm: str, baseline: str, ratings: pd.DataFrame, *, seed: int, resamples: int, empty: str
) -> WinRate:
    """The pair's win rate over participants (modeling.winrate: the dashboard's computation too)."""
    if ratings.empty:
        return WinRate(arm, baseline, message=empty)
    rate = win_rate(
        ratings["score"].to_numpy(),
        over="participants",
        participants=ratings["participant"].tolist(),
        seed=seed,
        resamples=resamples,
    )
    by = ratings.groupby("participant", sort=True)["score"].agg(["sum", "count"])
    return WinRate(
        arm=arm,
        baseline=baseline,
        participants=int(rate.participants or 0),
        n=rate.n,
        wins=rate.wins,
        ties=rate.ties,
        win_rate=rate.win_rate,
        ci_low=rate.ci_low,
        ci_high=rate.ci_high,
        p_greater=rate.p_value,
        p_two_sided=rate.p_two_sided,
        per_participant=tuple((str(p), float(row["sum"]), int(row["count"])) for p, row in by.iterrows()),
        message=rate.message,
    )


def human_win_rates(
    data: StudyData, selection: Selection, *, seed: int = DEFAULT_SEED, resamples: int = DEFAULT_RESAMPLES
) -> HumanWinRates:
    """The win rate of every comparison of the study on the counted participants, with a bootstrap
    interval over participants and the sign test."""
    rules = [*selection.lines, SCORING, INTERVAL.format(resamples=resamples, seed=seed)]
    if not data.comparisons:
        return HumanWinRates([], rules, message="The study has no comparisons: there is no arm pair to rate.")
    ratings, notes = counted_ratings(data, selection)
    rows = [
        _win_rate(
            arm,
            baseline,
            ratings[(ratings["arm"] == arm) & (ratings["baseline"] == baseline)],
            seed=seed,
            resamples=resamples,
            empty="No counted ratings of this pair yet.",
        )
        for arm, baseline in data.comparisons
    ]
    message = None
    if ratings.empty:
        k = len(selection.included)
        message = (
            f"No counted A/B ratings yet ({k} participant{'' if k == 1 else 's'} counted): win rates need "
            "participants who have rated pairs."
        )
    return HumanWinRates(rows, rules, notes, message)


# ---------------------------------------------------------------------------------------------------
# Shot-count sensitivity


@dataclass(frozen=True)
class ShotWinRate:
    shots: int
    rate: WinRate


@dataclass(frozen=True)
class ShotSensitivity:
    rows: list[ShotWinRate]
    shot_counts: list[int]
    rules: list[str]
    notes: list[str] = field(default_factory=list)
    message: str | None = None
    title: str = "Shot-count sensitivity"


def shot_sensitivity(
    data: StudyData, selection: Selection, *, seed: int = DEFAULT_SEED, resamples: int = DEFAULT_RESAMPLES
) -> ShotSensitivity:
    """Each comparison's win rate among the participants who made N picks, for every N the study gave
    (N is each participant's n_picks, fixed when their pairs were assigned)."""
    rules = [
        *selection.lines,
        "N: the picks a participant was assigned (their few-shot examples).",
        SCORING,
        INTERVAL.format(resamples=resamples, seed=seed),
    ]
    ratings, notes = counted_ratings(data, selection)
    shots = dict(zip(data.participants["participant"], data.participants["n_picks"], strict=True))
    ratings["shots"] = ratings["participant"].map(shots)
    counts = sorted(int(n) for n in ratings["shots"].dropna().unique())
    if ratings.empty:
        return ShotSensitivity([], [], rules, notes, "No counted A/B ratings yet.")
    if len(counts) < 2:
        return ShotSensitivity(
            [],
            counts,
            rules,
            notes,
            f"Every counted participant made N = {counts[0]} picks: give different participants different "
            "N (change the study's picks per participant between recruitment batches) to see the win rate "
            "against N.",
        )
    rows = []
    for arm, baseline in data.comparisons:
        pair = ratings[(ratings["arm"] == arm) & (ratings["baseline"] == baseline)]
        for n in counts:
            rate = _win_rate(
                arm,
                baseline,
                pair[pair["shots"] == n],
                seed=seed,
                resamples=resamples,
                empty=f"No counted ratings from participants with N = {n}.",
            )
            rows.append(ShotWinRate(n, rate))
    return ShotSensitivity(rows, counts, rules, notes)


# ---------------------------------------------------------------------------------------------------
# Synthetic-to-real transfer


@dataclass(frozen=True)
class SyntheticEval:
    """An `fspo eval` run's results.json (modeling.evaluate): `table` rows per arm (arm, model, context,
    cot, win_rate, ci_low, ci_high, n), its `baseline` arm and `shots`; `domain` when its dataset could
    be found."""

    path: str
    results: dict[str, Any]
    domain: str | None = None

    @property
    def baseline(self) -> str:
        return str(self.results["baseline"])

    def row(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.results["table"] if r.get("arm") == name), None)


def _dataset_domain(dataset: str, search: Sequence[Path]) -> str | None:
    for base in (Path("."), *search):
        manifest = (base / dataset / "dataset.json") if dataset else None
        if manifest is not None and manifest.is_file():
            try:
                return str(json.loads(manifest.read_text())["domain"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


def read_synthetic_eval(path: str | Path, *, search: Sequence[Path] = ()) -> SyntheticEval:
    """An `fspo eval` results.json (or the run folder holding it). Its dataset's domain is read from the
    dataset's manifest, looked for as given, beside the results and under `search`."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise AnalysisInputError(f"{path}: no such file (give an fspo eval results.json or its run folder)")
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AnalysisInputError(f"{path}: not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    table = results.get("table") if isinstance(results, dict) else None
    if not isinstance(table, list) or not isinstance(results.get("baseline"), str):
        raise AnalysisInputError(f"{path}: not an fspo eval results.json (no 'table' of arms or 'baseline')")
    for row in table:
        if not isinstance(row, dict) or not all(
            k in row for k in ("arm", "model", "win_rate", "ci_low", "ci_high")
        ):
            raise AnalysisInputError(
                f"{path}: a row of its table lacks arm, model, win_rate, ci_low or ci_high"
            )
    domain = _dataset_domain(str(results.get("dataset", "")), [path.parent, *search])
    return SyntheticEval(str(path), results, domain)


def _checkpoint_key(spec: str) -> str:
    for prefix in ("hf:", "vllm:"):
        if spec.startswith(prefix):
            spec = spec[len(prefix) :]
    return os.path.normpath(spec.strip()) if spec.strip() else ""


def same_checkpoint(a: str, b: str) -> bool:
    """Whether two generation specs name the same checkpoint folder: equal once `hf:`/`vllm:` prefixes
    are dropped and the paths normalized, or one a relative path that ends the other (the studio writes
    paths relative to its data folder)."""
    x, y = _checkpoint_key(a), _checkpoint_key(b)
    if not x or not y:
        return False
    return x == y or x.endswith(os.sep + y) or y.endswith(os.sep + x)


def _context(arm: StudyArm) -> str:
    """What the arm's prompt holds about the user, as `fspo eval` names it (modeling.evaluate.Arm)."""
    return "none" if arm.method == "no_context" else "fewshot"


CONTEXTS = {"none": "no user context", "fewshot": "few-shot", "description": "true description"}


def _spec(model: str, context: str, cot: bool) -> str:
    return f"{model} ({CONTEXTS.get(context, context)}{', CoT' if cot else ''})"


def _row_spec(row: dict[str, Any]) -> str:
    """What an evaluation row ran, as _spec says it."""
    return _spec(str(row["model"]), row.get("context", "fewshot"), bool(row.get("cot", False)))


def _runs_as(arm: StudyArm, row: dict[str, Any]) -> bool:
    """Whether an evaluation row ran this study arm: same checkpoint, user context and CoT."""
    return (
        same_checkpoint(arm.checkpoint, str(row["model"]))
        and row.get("context", "fewshot") == _context(arm)
        and bool(row.get("cot", False)) == arm.cot
    )


def _eval_arm_for(arm: StudyArm, evaluation: SyntheticEval) -> dict[str, Any] | None:
    rows = [r for r in evaluation.results["table"] if _runs_as(arm, r)]
    named = [r for r in rows if r["arm"] == arm.name]
    return (named or rows or [None])[0]


@dataclass(frozen=True)
class TransferRow:
    """One arm pair: its win rate on held-out synthetic users beside real participants', and the gap
    (synthetic - real) with its interval. `message` says why the gap is missing."""

    arm: str
    baseline: str
    checkpoint: str
    synthetic_arm: str | None = None
    synthetic_n: int | None = None
    synthetic_shots: int | None = None
    synthetic_win_rate: float | None = None
    synthetic_ci: tuple[float, float] | None = None
    real_participants: int = 0
    real_n: int = 0
    real_win_rate: float | None = None
    real_ci: tuple[float, float] | None = None
    gap: float | None = None
    gap_ci: tuple[float, float] | None = None
    notes: tuple[str, ...] = ()
    message: str | None = None


@dataclass(frozen=True)
class Transfer:
    rows: list[TransferRow]
    rules: list[str]
    source: str | None
    notes: list[str] = field(default_factory=list)
    message: str | None = None
    title: str = "Synthetic-to-real transfer"


GAP_RULE = (
    "Gap = synthetic - real win rate against the same baseline checkpoint. Its 95% interval treats the "
    "two as independent: each standard error is read from its interval (width / 3.92) and the gap's is "
    "their root sum of squares (normal approximation)."
)
MATCH_RULE = (
    "A study arm is matched to the evaluation's arm that ran the same checkpoint (hf:/vllm: prefixes "
    "dropped; a relative path matches the absolute path it ends) with the same user context (the picks "
    "as few-shot examples, or none) and the same user-description CoT; the same name decides a tie."
)


def synthetic_transfer(data: StudyData, human: HumanWinRates, evaluation: SyntheticEval | None) -> Transfer:
    """The paper's synthetic vs real table for this study: for each comparison whose arm and baseline
    checkpoints the synthetic evaluation also ran, both win rates and the gap."""
    rules = [*human.rules, MATCH_RULE, GAP_RULE]
    if evaluation is None:
        return Transfer(
            [],
            rules,
            None,
            message="No synthetic evaluation given: choose an fspo eval results.json of these arms' "
            "checkpoints (fspo analyze --synthetic-eval, or the form above) to compare.",
        )
    domain = str(data.study["domain"])
    notes = []
    if evaluation.domain is None:
        notes.append("The evaluation's dataset was not found, so its domain could not be checked.")
    elif evaluation.domain != domain:
        return Transfer(
            [],
            rules,
            evaluation.path,
            notes,
            f"The synthetic evaluation is on domain {evaluation.domain!r} and the study on {domain!r}: "
            "their win rates are not comparable.",
        )
    arms = {a.name: a for a in data.arms}
    human_rows = {(r.arm, r.baseline): r for r in human.rows}
    n_picks = {
        str(p): int(n)
        for p, n in zip(data.participants["participant"], data.participants["n_picks"], strict=True)
        if not pd.isna(n)
    }
    rows = []
    for arm_name, baseline_name in data.comparisons:
        arm, baseline = arms.get(arm_name), arms.get(baseline_name)
        real = human_rows.get((arm_name, baseline_name))
        if arm is not None and baseline is not None and real is not None:
            rows.append(_transfer_row(arm, baseline, real, evaluation, n_picks))
    return Transfer(rows, rules, evaluation.path, notes, _transfer_message(rows, evaluation))


def _transfer_row(
    arm: StudyArm, baseline: StudyArm, real: WinRate, evaluation: SyntheticEval, n_picks: dict[str, int]
) -> TransferRow:
    """One comparison's synthetic and real win rates and their gap, or the reason there is no gap."""
    base = TransferRow(
        arm=arm.name,
        baseline=baseline.name,
        checkpoint=arm.checkpoint,
        real_participants=real.participants,
        real_n=real.n,
        real_win_rate=real.win_rate,
        real_ci=None if real.ci_low is None else (real.ci_low, real.ci_high),  # type: ignore[arg-type]
    )
    synthetic = _eval_arm_for(arm, evaluation)
    if synthetic is None:
        return replace(
            base,
            message=f"The synthetic evaluation ran no arm as {_spec(arm.checkpoint, _context(arm), arm.cot)}.",
        )
    base = replace(base, **_synthetic_side(synthetic, evaluation, real, n_picks))
    eval_baseline = evaluation.row(evaluation.baseline)
    if synthetic["arm"] == evaluation.baseline:
        return replace(base, message="This checkpoint is the synthetic evaluation's baseline.")
    if eval_baseline is None or not _runs_as(baseline, eval_baseline):
        where = "nothing" if eval_baseline is None else _row_spec(eval_baseline)
        return replace(
            base,
            message=f"Different baselines: the synthetic win rate is against {where}, the real one "
            f"against {_spec(baseline.checkpoint, _context(baseline), baseline.cot)}.",
        )
    if real.win_rate is None or real.ci_low is None or real.ci_high is None:
        return replace(
            base, message="Not enough real ratings for a gap with an interval (at least two participants)."
        )
    gap, low, high = normal_gap_interval(
        (float(synthetic["win_rate"]), float(synthetic["ci_low"]), float(synthetic["ci_high"])),
        (real.win_rate, real.ci_low, real.ci_high),
        confidence=CONFIDENCE,
    )
    return replace(base, gap=gap, gap_ci=(low, high))


def _synthetic_side(
    synthetic: dict[str, Any], evaluation: SyntheticEval, real: WinRate, n_picks: dict[str, int]
) -> dict[str, Any]:
    """The evaluation row's fields of a TransferRow, with a note when its shots differ from the picks."""
    shots = evaluation.results.get("shots")
    notes = []
    picks = sorted({n_picks[p] for p, _, _ in real.per_participant if p in n_picks})
    if shots is not None and picks and picks != [int(shots)]:
        notes.append(
            f"Synthetic users were given {shots} shots; these participants made {_either(picks)} picks."
        )
    return {
        "synthetic_arm": str(synthetic["arm"]),
        "synthetic_n": None if synthetic.get("n") is None else int(synthetic["n"]),
        "synthetic_shots": None if shots is None else int(shots),
        "synthetic_win_rate": float(synthetic["win_rate"]),
        "synthetic_ci": (float(synthetic["ci_low"]), float(synthetic["ci_high"])),
        "notes": tuple(notes),
    }


def _transfer_message(rows: list[TransferRow], evaluation: SyntheticEval) -> str | None:
    if not rows:
        return "The study has no comparison to set beside the synthetic evaluation."
    if all(r.synthetic_arm is None for r in rows):
        ran = ", ".join(str(r["model"]) for r in evaluation.results["table"]) or "no arm"
        return (
            f"None of the study's arm checkpoints was evaluated on synthetic users in {evaluation.path} "
            f"(it ran {ran})."
        )
    return None


def _either(values: Sequence[int]) -> str:
    """3 / 3 or 5 / 3, 5 or 8."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
