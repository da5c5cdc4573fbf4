"""The procedural world: users, questions, responses and the exact oracle.

Everything here is either vectorized over many users / responses at once (numpy) or a small scalar
function over one text. Scalar twins of the vectorized labeler (``label_pair``) exist so that tests and
the naive benchmark can check the fast path against a plain reading of the rules.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .domain import Domain, count_sentences

# ---------------------------------------------------------------------------------------------------
# Preference structures

STRUCTURES = ("weighted", "topical", "bimodal", "noisy")
"""How a user's liking of a response is made (``Users.structure`` indexes this tuple):

- ``weighted``: one preferred value per trait; liking falls with the distance to it (ordinal traits) or
  is 1 only for it; traits weighted by user-specific Dirichlet weights. Every user of a dataset without
  a structure mix is ``weighted``; in a one-trait domain (elix) it is the single ordinal level.
- ``topical``: question-dependent; the preferred value is ``pref`` on questions of kind 0 and ``second``
  on questions of kind 1 (``question_kind``), e.g. simple on "what is" questions, deep on "how/why".
- ``bimodal``: not single-peaked; liking is the larger of the likings of two peaks ``pref`` and ``second``
  (at least two levels apart on an ordinal trait), so what lies between them is liked less than either.
- ``noisy``: a ``weighted`` user who picks the other response of a pair with probability ``flip``
  (drawn in [0.1, 0.3] per user); the flip is the user's, so it survives the judge's order-swap check.
  The oracle scores the underlying preference (a flip is a labeling event, not a taste).
"""
WEIGHTED, TOPICAL, BIMODAL, NOISY = range(len(STRUCTURES))
FLIP_RANGE = (0.1, 0.3)


def check_structures(mix: dict[str, float] | None, held_out: Sequence[str] = ()) -> None:
    """A structure mix names known structures with non-negative weights and a positive sum; held-out
    structures are known ones drawn by the mix (ValueError naming the problem)."""
    names = set(mix or {}) | set(held_out)
    unknown = sorted(names - set(STRUCTURES))
    if unknown:
        raise ValueError(f"unknown preference structures {unknown}; known: {list(STRUCTURES)}")
    if mix is not None and (min(mix.values(), default=-1) < 0 or sum(mix.values()) <= 0):
        raise ValueError("structure weights must be non-negative with a positive sum")
    never = sorted(set(held_out) - {k for k, v in (mix or {}).items() if v > 0})
    if never:
        raise ValueError(f"held-out structures {never} are not drawn by the structure mix")


def question_kind(domain: Domain, question: str) -> int:
    """The kind of a question, which ``topical`` users' preference depends on: 1 when it was written
    from a template at an odd index of the domain's list (elix: "How does X work?", "Why does X
    matter?"), else 0 (also for a question that matches no template)."""
    for k, tpl in enumerate(domain.spec.questions.templates):
        head, _, tail = tpl.partition("{topic}")
        if question.startswith(head) and question.endswith(tail) and len(question) > len(head) + len(tail):
            return k % 2
    return 0


def peaks(
    structure: np.ndarray, pref: np.ndarray, second: np.ndarray, kind: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The two values each user likes most on a question of ``kind``, per trait (equal unless bimodal).

    structure, kind: [...] (broadcastable); pref, second: [..., T]."""
    on_second = ((structure == TOPICAL) & (kind == 1))[..., None]
    first = np.where(on_second, second, pref)
    return first, np.where((structure == BIMODAL)[..., None], second, first)


# ---------------------------------------------------------------------------------------------------
# Users (domain randomization)


@dataclass
class Users:
    """A block of users as arrays. T = number of traits, A = number of attributes."""

    user_id: np.ndarray  # [U] int64
    attrs: np.ndarray  # [U, A] int16, index into each attribute's values
    pref: np.ndarray  # [U, T] int16, the value of each trait this persona would pick if it cared
    weight: np.ndarray  # [U, T] float64, importance of each trait, rows sum to 1
    stated: np.ndarray  # [U, T] bool, traits the persona's description states (grows with refinement)
    stated_initial: np.ndarray  # [U, T] bool, before iterative persona improvement
    rounds: np.ndarray  # [U] int8, refinement rounds this user took
    text_choice: np.ndarray  # [U, 1 + A + T] int64, random picks of sentence variants for the description
    structure: np.ndarray  # [U] int8, index into STRUCTURES
    second: np.ndarray  # [U, T] int16, the other peak (topical: kind-1 questions; bimodal), else = pref
    flip: np.ndarray  # [U] float64, probability that the user picks the other response (noisy), else 0

    def __len__(self) -> int:
        return len(self.user_id)


def sample_users(
    domain: Domain,
    rng: np.random.Generator,
    n: int,
    start_id: int,
    structures: dict[str, float] | None = None,
) -> Users:
    """Sample n users: attributes from their weights, then each trait's preferred value from its prior
    (conditioned on an attribute when the domain says so), importance weights from a Dirichlet, and
    which traits the initial persona states. With a ``structures`` mix (weights by name), each user's
    structure is then drawn from it, with its second peak and flip rate; without one every user is
    ``weighted`` and the random stream is the one it always was."""
    spec = domain.spec
    attr_names = domain.attribute_names
    attrs = np.empty((n, len(attr_names)), dtype=np.int16)
    for j, name in enumerate(attr_names):
        a = spec.attributes[name]
        p = np.asarray(a.weights if a.weights else np.ones(len(a.values)), dtype=np.float64)
        attrs[:, j] = rng.choice(len(a.values), size=n, p=p / p.sum())
    T = len(domain.traits)
    pref = np.empty((n, T), dtype=np.int16)
    for t, trait in enumerate(domain.traits):
        k = len(trait.values)
        if trait.prior is None:
            pref[:, t] = rng.integers(0, k, size=n)
            continue
        j = attr_names.index(trait.prior.given)
        given_values = spec.attributes[trait.prior.given].values
        table = np.asarray([trait.prior.table[v] for v in given_values], dtype=np.float64)
        cdf = np.cumsum(table / table.sum(axis=1, keepdims=True), axis=1)[attrs[:, j]]
        pref[:, t] = np.minimum((rng.random((n, 1)) > cdf).sum(axis=1), k - 1)
    weight = rng.dirichlet(np.full(T, 2.0), size=n) if T > 1 else np.ones((n, 1))
    stated_p = np.asarray([t.stated_prob for t in domain.traits])
    stated = rng.random((n, T)) < stated_p
    text_choice = rng.integers(0, 1 << 30, size=(n, 1 + len(attr_names) + T))
    structure, second, flip = np.zeros(n, dtype=np.int8), pref.copy(), np.zeros(n)
    if structures is not None:
        structure, second, flip = _sample_structures(domain, rng, pref, structures)
    return Users(
        user_id=np.arange(start_id, start_id + n, dtype=np.int64),
        attrs=attrs,
        pref=pref,
        weight=weight,
        stated=stated,
        stated_initial=stated.copy(),
        rounds=np.zeros(n, dtype=np.int8),
        text_choice=text_choice,
        structure=structure,
        second=second,
        flip=flip,
    )


def _sample_structures(
    domain: Domain, rng: np.random.Generator, pref: np.ndarray, mix: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's structure from the mix, a second peak per trait (topical: any other value; bimodal:
    two or more levels away on an ordinal trait of three or more values) and a flip rate (noisy)."""
    check_structures(mix)
    p = np.asarray([mix.get(name, 0.0) for name in STRUCTURES], dtype=np.float64)
    n = len(pref)
    structure = rng.choice(len(STRUCTURES), size=n, p=p / p.sum()).astype(np.int8)
    second = pref.copy()
    for t, trait in enumerate(domain.traits):
        k = len(trait.values)
        gap = np.abs(np.arange(k)[None, :] - pref[:, t : t + 1])
        far = gap >= 2 if trait.ordinal and k >= 3 else gap >= 1
        for s, allowed in ((TOPICAL, gap >= 1), (BIMODAL, far)):
            r = np.where(allowed, rng.random((n, k)), -1.0)  # a uniform pick among the allowed values
            second[:, t] = np.where(structure == s, r.argmax(axis=1), second[:, t])
    flip = np.where(structure == NOISY, rng.uniform(*FLIP_RANGE, size=n), 0.0)
    return structure, second, flip


def persona_description(domain: Domain, users: Users, i: int, *, initial: bool = False) -> str:
    """The persona's text: an intro from its attributes, a sentence for some attributes, and one
    sentence per stated preference."""
    spec = domain.spec
    c = users.text_choice[i]
    fields = {
        name: spec.attributes[name].values[users.attrs[i, j]] for j, name in enumerate(domain.attribute_names)
    }
    intro = spec.persona.intro
    parts = [intro[c[0] % len(intro)].format(**fields)]
    for j, name in enumerate(domain.attribute_names):
        options = spec.persona.attribute_sentences.get(name, {}).get(fields[name])
        if options and c[1 + j] % 3 != 0:  # mention the attribute two times in three
            parts.append(options[(c[1 + j] // 3) % len(options)])
    stated = users.stated_initial[i] if initial else users.stated[i]
    off = 1 + len(domain.attribute_names)
    for t, trait in enumerate(domain.traits):
        if stated[t]:
            describe = trait.values[users.pref[i, t]].describe
            parts.append(describe[c[off + t] % len(describe)])
    if users.structure[i] in (TOPICAL, BIMODAL):  # the second peak, where it is stated
        if users.structure[i] == TOPICAL:
            example = spec.questions.templates[1 % len(spec.questions.templates)].format(topic="something")
            lead = f'But for questions like "{example}":'
        else:
            lead = "This suits me just as well:"
        for t, trait in enumerate(domain.traits):
            if stated[t]:
                describe = trait.values[users.second[i, t]].describe
                parts.append(f"{lead} {describe[(c[off + t] // 7) % len(describe)]}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------
# Questions and responses


@dataclass
class Questions:
    text: list[str]
    topic: list[str]
    topic_id: np.ndarray  # [Q] int32
    split: np.ndarray  # [Q] "train" | "test" (held-out topics)
    kind: np.ndarray  # [Q] int8, the question's kind (see question_kind)


def build_questions(
    domain: Domain, rng: np.random.Generator, n_questions: int | None, test_frac: float
) -> Questions:
    """All (template, topic) combinations, or a random subset of n_questions; topics are split so that
    held-out questions are about topics never seen in training."""
    topics = domain.topics
    templates = domain.spec.questions.templates
    n_test_topics = max(1, round(test_frac * len(topics))) if test_frac > 0 else 0
    test_topics = set(rng.choice(len(topics), size=n_test_topics, replace=False).tolist())
    combos = [(ti, k) for ti in range(len(topics)) for k in range(len(templates))]
    if n_questions is not None and n_questions < len(combos):
        keep = np.sort(rng.choice(len(combos), size=n_questions, replace=False))
        combos = [combos[i] for i in keep]
    topic_id = np.asarray([ti for ti, _ in combos], dtype=np.int32)
    return Questions(
        text=[templates[k].format(topic=topics[ti]) for ti, k in combos],
        topic=[topics[ti] for ti, _ in combos],
        topic_id=topic_id,
        split=np.where(np.isin(topic_id, list(test_topics)), "test", "train"),
        kind=np.asarray([k % 2 for _, k in combos], dtype=np.int8),
    )


def render_response(domain: Domain, topic: str, values: Sequence[int], rnd: random.Random) -> str:
    """Write a response to a question about ``topic`` with the given trait values (index per trait).

    Lexical traits contribute one or two of their value's phrases, the length trait sets the sentence
    count, neutral filler makes up the rest, and the layout trait formats the sentences."""
    spec = domain.spec
    n = None
    layout = "prose"
    lexical: list[list[str]] = []
    for t, trait in enumerate(domain.traits):
        v = trait.values[values[t]]
        if trait.kind == "length":
            n = rnd.randint(*v.sentences)  # type: ignore[misc]
        elif trait.kind == "layout":
            layout = v.name
        else:
            lexical.append(v.phrases)
    if n is None:
        n = rnd.randint(*spec.response.sentences)
    per_trait = 2 if n >= 2 * len(lexical) + 2 else 1
    sentences = [p for phrases in lexical for p in rnd.sample(phrases, per_trait)]
    filler = spec.response.filler
    n_fill = max(0, n - len(sentences))
    sentences += rnd.sample(filler, n_fill) if n_fill <= len(filler) else rnd.choices(filler, k=n_fill)
    rnd.shuffle(sentences)
    sentences = [s.replace("{topic}", topic) for s in sentences]
    sentences = [s[0].upper() + s[1:] for s in sentences]
    if layout == "bullets":
        return "\n".join("- " + s for s in sentences)
    if layout == "numbered":
        return "\n".join(f"{i}. {s}" for i, s in enumerate(sentences, 1))
    return " ".join(sentences)


@dataclass
class Responses:
    text: list[str]
    question_id: np.ndarray  # [R] int32
    values: np.ndarray  # [R, T] int16
    offsets: np.ndarray  # [Q + 1]: responses of question q are offsets[q]:offsets[q+1]


def build_responses(domain: Domain, questions: Questions, per_question: int, seed: int) -> Responses:
    """A pool of responses per question, each with trait values drawn without repetition from all
    combinations while they last (persona steering, procedurally)."""
    sizes = domain.trait_sizes
    n_combos = int(np.prod(sizes))
    rng = np.random.default_rng([seed, 7])
    Q = len(questions.text)
    texts: list[str] = []
    values = np.empty((Q * per_question, len(sizes)), dtype=np.int16)
    for q in range(Q):
        picks = rng.choice(n_combos, size=per_question, replace=per_question > n_combos)
        vals = np.stack(np.unravel_index(picks, sizes), axis=1)
        values[q * per_question : (q + 1) * per_question] = vals
        rnd = random.Random(int(rng.integers(1 << 62)))
        topic = questions.topic[q]
        texts.extend(render_response(domain, topic, row.tolist(), rnd) for row in vals)
    return Responses(
        text=texts,
        question_id=np.repeat(np.arange(Q, dtype=np.int32), per_question),
        values=values,
        offsets=np.arange(0, Q * per_question + 1, per_question),
    )


# ---------------------------------------------------------------------------------------------------
# The oracle: read trait values back from any text, and score it for a user


_BULLET = re.compile(r"^\s*[-*\u2022]\s+")
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+")


def detect_traits(domain: Domain, text: str) -> list[int | None]:
    """The value of each trait that ``text`` expresses, or None where it expresses none (or a tie)."""
    out: list[int | None] = []
    for trait, pats in zip(domain.traits, domain.marker_patterns, strict=True):
        if trait.kind == "lexical":
            assert pats is not None
            counts = [len(p.findall(text)) for p in pats]
            best = max(counts)
            out.append(counts.index(best) if best > 0 and counts.count(best) == 1 else None)
        elif trait.kind == "length":
            n = count_sentences(text)
            dist = [max(v.sentences[0] - n, n - v.sentences[1], 0) for v in trait.values]  # type: ignore[index]
            best = min(dist)
            out.append(dist.index(best) if dist.count(best) == 1 else None)
        else:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            n_bul = sum(bool(_BULLET.match(ln)) for ln in lines)
            n_num = sum(bool(_NUMBERED.match(ln)) for ln in lines)
            names = [v.name for v in trait.values]
            if n_bul >= 2 and n_bul >= 0.8 * len(lines):
                found = "bullets"
            elif n_num >= 2 and n_num >= 0.8 * len(lines):
                found = "numbered"
            elif n_bul == 0 and n_num == 0 and lines:
                found = "prose"
            else:
                found = None
            out.append(names.index(found) if found in names else None)
    return out


def utility(
    domain: Domain,
    pref: np.ndarray,
    weight: np.ndarray,
    values: np.ndarray,
    second: np.ndarray | None = None,
) -> np.ndarray:
    """How much users like responses: sum over traits of weight * W[t][pref, value], where a user with
    a second peak likes a value as much as the closer of the two: max(W[pref, v], W[second, v]).

    pref, weight, second: [N, T] (a row per (user, response) pair, or broadcastable; ``peaks`` gives
    pref/second for a question); values: [N, T] with -1 where a trait was not detected (counts as 0).
    Unstated traits are passed with weight 0."""
    shape = np.broadcast_shapes(pref.shape[:-1], values.shape[:-1])
    if second is not None:
        shape = np.broadcast_shapes(shape, second.shape[:-1])
    total = np.zeros(shape, dtype=np.float64)
    for t, W in enumerate(domain.value_weights):
        v = values[..., t]
        liked = W[pref[..., t], np.maximum(v, 0)]
        if second is not None:
            liked = np.maximum(liked, W[second[..., t], np.maximum(v, 0)])
        total += weight[..., t] * liked * (v >= 0)
    return total


def score_text(
    domain: Domain,
    pref: Sequence[int],
    weight: Sequence[float],
    topic: str,
    text: str,
    second: Sequence[int] | None = None,
) -> float:
    """The exact oracle's score of any text (a rendered response or a model's output) for a user with
    full preferences ``pref``/``weight`` (and a second peak, ``UserPreference.score`` resolves both for
    a question). Off-topic or degenerate text loses half a point each."""
    detected = np.asarray([-1 if v is None else v for v in detect_traits(domain, text)])
    two = None if second is None else np.asarray(second)
    score = float(utility(domain, np.asarray(pref), np.asarray(weight, dtype=np.float64), detected, two))
    if topic.lower() not in text.lower():
        score -= 0.5
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    if not sentences or len(set(sentences)) < 0.67 * len(sentences):
        score -= 0.5
    return score


@dataclass(frozen=True)
class UserPreference:
    """One user's preference as the oracle reads it (a row of a dataset's users table)."""

    structure: str
    pref: tuple[int, ...]
    weight: tuple[float, ...]
    second: tuple[int, ...]
    flip: float = 0.0

    def peaks(self, kind: int) -> tuple[list[int], list[int]]:
        """The two most liked values per trait on a question of this kind (see ``peaks``)."""
        a, b = peaks(
            np.asarray(STRUCTURES.index(self.structure)),
            np.asarray(self.pref),
            np.asarray(self.second),
            np.asarray(kind),
        )
        return a.tolist(), b.tolist()

    def score(self, domain: Domain, question: str, topic: str, text: str) -> float:
        """``score_text`` for this user on ``question``: the structure decides which values it likes."""
        first, second = self.peaks(question_kind(domain, question))
        return score_text(domain, first, self.weight, topic, text, second=second)


def user_preferences(domain: Domain, users: Any, *, stated_only: bool = True) -> dict[int, UserPreference]:
    """Every user of a users table (a pandas DataFrame indexed by user_id) as a ``UserPreference``.
    ``stated_only``: unstated traits get weight 0, as the pairwise judge saw them. A table without a
    ``structure`` column (a dataset made without a structure mix) holds ``weighted`` users."""
    names = {t.name: [v.name for v in t.values] for t in domain.traits}
    for t in domain.traits:
        if f"pref_{t.name}" not in users.columns:
            raise ValueError(f"users table has no pref_{t.name}; the dataset is not of domain {domain.name}")
    has_structure = "structure" in users.columns
    out = {}
    for uid, row in users.iterrows():
        pref = tuple(names[t.name].index(row[f"pref_{t.name}"]) for t in domain.traits)
        weight = tuple(
            float(row[f"weight_{t.name}"]) * (bool(row[f"stated_{t.name}"]) or not stated_only)
            for t in domain.traits
        )
        if has_structure:
            second = tuple(names[t.name].index(row[f"second_{t.name}"]) for t in domain.traits)
            out[int(uid)] = UserPreference(row["structure"], pref, weight, second, float(row["flip_rate"]))
        else:
            out[int(uid)] = UserPreference("weighted", pref, weight, pref)
    return out


# ---------------------------------------------------------------------------------------------------
# The simulated pairwise judge (labels given a persona description)


@dataclass(frozen=True)
class JudgeConfig:
    """A pairwise judge that reads the persona description: when the description decides the pair it
    picks the better response (wrong with probability ``noise``); when it does not (a tie), it falls back
    on position, picking the first shown with probability ``position_bias``."""

    noise: float = 0.02
    position_bias: float = 0.8

    def __post_init__(self) -> None:
        if not (0 <= self.noise < 0.5 and 0 <= self.position_bias <= 1):
            raise ValueError("judge noise must be in [0, 0.5) and position_bias in [0, 1]")


def judge_picks_first(margin: np.ndarray, rng: np.random.Generator, cfg: JudgeConfig) -> np.ndarray:
    """margin = utility(first shown) - utility(second shown) under the stated persona → picks first?"""
    u = rng.random(margin.shape)
    tie = np.abs(margin) < 1e-9
    decided = (margin > 0) ^ (u < cfg.noise)
    return np.where(tie, u < cfg.position_bias, decided)


def label_both_orders(
    margin_ab: np.ndarray, rng: np.random.Generator, cfg: JudgeConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Ask (a, b) then (b, a). Returns (a_wins_first_ask, consistent)."""
    a_first = judge_picks_first(margin_ab, rng, cfg)
    a_second = ~judge_picks_first(-margin_ab, rng, cfg)
    return a_first, a_first == a_second


def label_pair(
    domain: Domain,
    pref: Sequence[int],
    weight: Sequence[float],
    stated: Sequence[bool],
    values_a: Sequence[int],
    values_b: Sequence[int],
    draws: Sequence[float],
    cfg: JudgeConfig,
    *,
    second: Sequence[int] | None = None,
    flipped: bool = False,
) -> tuple[bool, bool]:
    """Scalar twin of ``label_both_orders`` for one pair (used by tests and the naive benchmark).
    ``draws`` are the judge's two uniform draws; ``second``: the user's second peaks on this question
    (``peaks``); ``flipped``: a noisy user picks the other response this time. Returns (a_wins,
    consistent)."""
    two = pref if second is None else second

    def u(vals: Sequence[int]) -> float:
        return sum(
            w * max(W[p, v], W[q, v])
            for w, W, p, q, v, s in zip(weight, domain.value_weights, pref, two, vals, stated, strict=True)
            if s
        )

    def picks_first(m: float, draw: float) -> bool:
        if abs(m) < 1e-9:
            return draw < cfg.position_bias
        return (m > 0) != (draw < cfg.noise)

    m = (u(values_a) - u(values_b)) * (-1 if flipped else 1)
    a_first = picks_first(m, draws[0])
    a_second = not picks_first(-m, draws[1])
    return a_first, a_first == a_second
