"""Consistency: does a participant give the same answer to a pair shown twice (sides swapped), beside the
synthetic users' self-consistency measured by the data engine; and do different participants agree on
the candidate pairs they all picked from (Krippendorff's alpha, Cohen's kappa)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .data import StudyData
from .rules import Selection
from .stats import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    cohen_kappa,
    krippendorff_alpha_nominal,
    participant_bootstrap,
)

MIN_SHARED_PAIRS = 3  # pairs two participants must both have picked from for their Cohen's kappa

# The data engine's own consistency figures (modeling.synth, the dataset manifest's `quality`).
SYNTHETIC_FIGURES = (
    (
        "order_swap_agreement_final",
        "Labels agree when a pair is asked in both orders (after persona refinement)",
    ),
    ("repeat_agreement", "Labels agree when the same pair is asked again"),
)


@dataclass(frozen=True)
class ParticipantConsistency:
    participant: str
    repeats: int
    consistent: int

    @property
    def agreement(self) -> float:
        return self.consistent / self.repeats


@dataclass(frozen=True)
class InterRater:
    """Agreement between participants on the elicitation pairs several of them picked from. Each pick
    is coded by the pool response chosen (response_a or response_b), whatever side it was shown on."""

    units: int = 0  # candidate pairs picked by two or more counted participants
    raters: int = 0
    judgments: int = 0  # picks on those pairs
    observed_agreement: float | None = None  # share of agreeing pairs of picks within a pair
    alpha: float | None = None
    kappa_mean: float | None = None  # Light's kappa: mean Cohen's kappa over pairs of participants
    kappa_pairs: int = 0  # participant pairs whose kappa entered the mean
    kappa_undefined: int = 0  # pairs that shared enough pairs but always gave one same answer
    message: str | None = None


@dataclass(frozen=True)
class Consistency:
    participants: list[ParticipantConsistency]
    repeats: int
    consistent: int
    agreement: float | None
    ci_low: float | None
    ci_high: float | None
    kappa: float | None  # first vs second answer, pooled over every repeat
    synthetic: list[tuple[str, str, float]]  # (key, what it measures, value)
    synthetic_source: str | None
    inter_rater: InterRater
    rules: list[str]
    notes: list[str] = field(default_factory=list)
    message: str | None = None
    title: str = "Consistency"


def _repeat_answers(data: StudyData, selection: Selection) -> pd.DataFrame:
    """Every answered repeat with its original: `consistent`, and both answers coded as "chose the
    response that was on the left the first time" (the repeat shows it on the right)."""
    j = data.judgments
    ratings = j[(j["kind"] == "rating") & ~j["is_attention_check"].fillna(False).astype(bool)]
    ratings = ratings[ratings["participant"].isin(selection.included)]
    repeats = ratings[ratings["is_repeat"].fillna(False).astype(bool) & ratings["repeat_consistent"].notna()]
    originals = ratings[["participant", "position", "chosen_side"]].rename(
        columns={"position": "repeat_of_position", "chosen_side": "original_side"}
    )
    both = repeats.merge(originals, on=["participant", "repeat_of_position"], how="inner")
    both["first"] = both["original_side"] == "left"
    both["second"] = both["chosen_side"] == "right"
    both["consistent"] = both["repeat_consistent"].astype(bool)
    return both


def _inter_rater(data: StudyData, selection: Selection) -> InterRater:
    j = data.judgments
    picks = j[(j["kind"] == "pick") & j["participant"].isin(selection.included) & j["pair_id"].notna()]
    picks = picks.assign(
        value=((picks["chosen_side"] == "left") == picks["a_on_left"]).map({True: "a", False: "b"})
    )
    by_unit = picks.groupby("pair_id")["value"].agg(list)
    shared = by_unit[by_unit.map(len) >= 2]
    if shared.empty:
        return InterRater(
            message="No candidate pair was picked from by two or more counted participants: agreement "
            "between participants needs pairs they have in common (a pool no larger than the picks "
            "per participant, or more participants)."
        )
    pairs_agree = [
        sum(a == b for a, b in itertools.combinations(values, 2)) / (len(values) * (len(values) - 1) / 2)
        for values in shared
    ]
    counted = picks[picks["pair_id"].isin(shared.index)]
    answers = {
        p: dict(zip(rows["pair_id"], rows["value"], strict=True))
        for p, rows in counted.groupby("participant")
    }
    kappas, undefined = [], 0
    for x, y in itertools.combinations(sorted(answers), 2):
        common = sorted(set(answers[x]) & set(answers[y]))
        if len(common) < MIN_SHARED_PAIRS:
            continue
        k = cohen_kappa([answers[x][u] for u in common], [answers[y][u] for u in common])
        if k is None:
            undefined += 1
        else:
            kappas.append(k)
    alpha = krippendorff_alpha_nominal(shared.tolist())
    message = None
    if alpha is None:
        message = (
            "Every counted participant picked the same response of every shared pair: agreement beyond "
            "chance is undefined when there is no variation."
        )
    return InterRater(
        units=len(shared),
        raters=counted["participant"].nunique(),
        judgments=len(counted),
        observed_agreement=sum(pairs_agree) / len(pairs_agree),
        alpha=alpha,
        kappa_mean=sum(kappas) / len(kappas) if kappas else None,
        kappa_pairs=len(kappas),
        kappa_undefined=undefined,
        message=message,
    )


def consistency(
    data: StudyData,
    selection: Selection,
    *,
    synthetic_quality: dict[str, Any] | None = None,
    synthetic_source: str | None = None,
    seed: int = DEFAULT_SEED,
    resamples: int = DEFAULT_RESAMPLES,
) -> Consistency:
    """Intra-participant agreement on repeated pairs (per participant and pooled, with a bootstrap
    interval over participants and Cohen's kappa of first vs second answers), the data engine's
    self-consistency figures when a synthetic dataset's quality block is given, and inter-participant
    agreement on shared elicitation pairs."""
    rules = _consistency_rules(selection, seed=seed, resamples=resamples)
    synthetic = _synthetic_figures(synthetic_quality)
    notes = []
    if synthetic_quality is None:
        notes.append(
            "No synthetic dataset given: choose one (fspo analyze --synthetic-dataset, or the form above) "
            "to show its users' self-consistency beside the participants'."
        )
    answers = _repeat_answers(data, selection)
    inter = _inter_rater(data, selection)
    if answers.empty:
        return Consistency(
            [], 0, 0, None, None, None, None, synthetic, synthetic_source, inter, rules, notes,
            "No counted participant has answered a consistency repeat yet (the study shows "
            f"{data.study['consistency_repeats']} per participant).",
        )  # fmt: skip
    by = answers.groupby("participant", sort=True)["consistent"].agg(["sum", "count"])
    people = [ParticipantConsistency(str(p), int(r["count"]), int(r["sum"])) for p, r in by.iterrows()]
    low = high = None
    if len(by) >= 2:
        low, high = participant_bootstrap(
            by["sum"].to_numpy(dtype=float), by["count"].to_numpy(dtype=float), seed=seed, resamples=resamples
        )
    else:
        notes.append("One participant with repeats: an interval over participants needs at least two.")
    kappa = cohen_kappa(answers["first"].tolist(), answers["second"].tolist())
    if kappa is None:
        notes.append("Kappa is undefined: every first and second answer chose the same response.")
    return Consistency(
        participants=people,
        repeats=int(by["count"].sum()),
        consistent=int(by["sum"].sum()),
        agreement=float(by["sum"].sum() / by["count"].sum()),
        ci_low=low,
        ci_high=high,
        kappa=kappa,
        synthetic=synthetic,
        synthetic_source=synthetic_source,
        inter_rater=inter,
        rules=rules,
        notes=notes,
    )


def _consistency_rules(selection: Selection, *, seed: int, resamples: int) -> list[str]:
    return [
        *selection.lines,
        "A repeat shows an earlier A/B pair again with sides swapped; it agrees when the same response is "
        "chosen again. Agreement pools every repeat; its 95% interval is a percentile bootstrap over "
        f"participants ({resamples:,} resamples, seed {seed}). Kappa: Cohen's kappa of the first against "
        "the second answer, each coded by the response chosen.",
        "Between participants: the elicitation picks, coded by the pool response chosen; Krippendorff's "
        "alpha (nominal) over pairs picked from by two or more participants, and the mean Cohen's kappa "
        f"over pairs of participants who share at least {MIN_SHARED_PAIRS} pairs (Light's kappa).",
    ]


def _synthetic_figures(quality: dict[str, Any] | None) -> list[tuple[str, str, float]]:
    """The data engine's self-consistency figures a dataset's quality block holds, as (key, text, value)."""
    figures = []
    for key, text in SYNTHETIC_FIGURES:
        value = (quality or {}).get(key)
        if isinstance(value, int | float):
            figures.append((key, text, float(value)))
    return figures
