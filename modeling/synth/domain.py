"""Domain files: what a synthetic domain is made of, validated on load.

A domain is a YAML file (see ``domains/*.yaml``) with
- ``attributes``: demographic attributes and their sampling weights (domain randomization),
- ``traits``: the preference dimensions. Each trait has values and a kind that says how the oracle
  reads it back from any text: ``lexical`` (marker phrases), ``length`` (sentence count) or
  ``layout`` (prose, bullet list or numbered list),
- ``questions``: question templates over slot values,
- ``response``: neutral filler sentences.

The checks below make the procedural oracle exact: a rendered response is read back to exactly the
trait values it was rendered with (tested for every domain).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DOMAIN_DIR = Path(__file__).parent / "domains"
BUILTIN_DOMAINS = ("reviews", "elix", "roleplay")
LAYOUTS = ("prose", "bullets", "numbered")


class DomainError(ValueError):
    """A domain file is missing or malformed; the message is one line naming the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Attribute(_Strict):
    values: list[str] = Field(min_length=1)
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> Attribute:
        if self.weights is not None and len(self.weights) != len(self.values):
            raise ValueError(f"{len(self.weights)} weights for {len(self.values)} values")
        if self.weights is not None and (min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError("weights must be non-negative with a positive sum")
        if len(set(self.values)) != len(self.values):
            raise ValueError("values must be unique")
        return self


class Prior(_Strict):
    given: str
    table: dict[str, list[float]]


class TraitValue(_Strict):
    name: str
    describe: list[str] = Field(min_length=1)
    markers: list[str] = Field(default_factory=list)
    phrases: list[str] = Field(default_factory=list)
    sentences: tuple[int, int] | None = None


class Trait(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: Literal["lexical", "length", "layout"]
    ordinal: bool = False
    stated_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    prior: Prior | None = None
    values: list[TraitValue] = Field(min_length=2)

    @model_validator(mode="after")
    def _check(self) -> Trait:
        names = [v.name for v in self.values]
        if len(set(names)) != len(names):
            raise ValueError(f"trait {self.name!r}: value names must be unique")
        for v in self.values:
            if self.kind == "lexical" and (not v.markers or len(v.phrases) < 2):
                raise ValueError(
                    f"trait {self.name!r} value {v.name!r}: a lexical value needs markers and at least 2 phrases"
                )
            if self.kind == "length" and (v.sentences is None or not 1 <= v.sentences[0] <= v.sentences[1]):
                raise ValueError(
                    f"trait {self.name!r} value {v.name!r}: a length value needs sentences: [min, max]"
                )
            if self.kind == "layout" and v.name not in LAYOUTS:
                raise ValueError(
                    f"trait {self.name!r}: layout values must be among {LAYOUTS}, got {v.name!r}"
                )
        if self.kind == "length":
            spans = sorted(v.sentences for v in self.values if v.sentences)
            for (_, hi), (lo, _) in itertools.pairwise(spans):
                if lo <= hi:
                    raise ValueError(f"trait {self.name!r}: sentence ranges overlap")
        return self


class Questions(_Strict):
    templates: list[str] = Field(min_length=1)
    topic: str
    slots: dict[str, list[str]]


class Persona(_Strict):
    intro: list[str] = Field(min_length=1)
    attribute_sentences: dict[str, dict[str, list[str]]] = Field(default_factory=dict)


class Response(_Strict):
    filler: list[str] = Field(min_length=2)
    sentences: tuple[int, int] = (4, 6)


class DomainSpec(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    title: str
    format_version: Literal[1]
    task: str
    attributes: dict[str, Attribute] = Field(min_length=1)
    persona: Persona
    traits: list[Trait] = Field(min_length=1)
    questions: Questions
    response: Response


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def count_sentences(text: str) -> int:
    """Sentences in a response: terminal . ! ? marks, after list prefixes are stripped."""
    body = "\n".join(_LIST_PREFIX.sub("", line) for line in text.splitlines())
    return len(_SENTENCE_END.findall(body))


_LIST_PREFIX = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")


@dataclass(frozen=True)
class Domain:
    """A validated domain plus the arrays the vectorized engine needs."""

    spec: DomainSpec
    source: str  # path or builtin name
    sha256: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def traits(self) -> list[Trait]:
        return self.spec.traits

    @cached_property
    def trait_sizes(self) -> list[int]:
        return [len(t.values) for t in self.traits]

    @cached_property
    def attribute_names(self) -> list[str]:
        return list(self.spec.attributes)

    @cached_property
    def value_weights(self) -> list[np.ndarray]:
        """W[t][p, v]: how much a user who prefers value p of trait t likes value v (in [0, 1])."""
        out = []
        for t in self.traits:
            k = len(t.values)
            idx = np.arange(k)
            if t.ordinal:
                w = 1.0 - np.abs(idx[:, None] - idx[None, :]) / (k - 1)
            else:
                w = np.eye(k)
            out.append(w.astype(np.float64))
        return out

    @cached_property
    def marker_patterns(self) -> list[list[re.Pattern[str]] | None]:
        """One compiled pattern per value of each lexical trait (word-bounded, case-insensitive)."""
        pats: list[list[re.Pattern[str]] | None] = []
        for t in self.traits:
            if t.kind != "lexical":
                pats.append(None)
                continue
            pats.append([_marker_regex(v.markers) for v in t.values])
        return pats

    @cached_property
    def topics(self) -> list[str]:
        q = self.spec.questions
        names = list(q.slots)
        return [
            q.topic.format(**dict(zip(names, combo, strict=True)))
            for combo in itertools.product(*q.slots.values())
        ]

    def trait_index(self, name: str) -> int:
        for i, t in enumerate(self.traits):
            if t.name == name:
                return i
        raise KeyError(name)


def _marker_regex(markers: list[str]) -> re.Pattern[str]:
    alts = sorted((re.escape(m.lower()) for m in markers), key=len, reverse=True)
    return re.compile(r"(?<![\w'])(?:" + "|".join(alts) + r")(?![\w'])", re.IGNORECASE)


def load_domain(name_or_path: str | Path) -> Domain:
    """Load a built-in domain by name (reviews, elix, roleplay) or a domain YAML file by path."""
    key = str(name_or_path)
    path = DOMAIN_DIR / f"{key}.yaml" if key in BUILTIN_DOMAINS else Path(key)
    if not path.is_file():
        raise DomainError(f"domain {key!r}: no such built-in domain ({', '.join(BUILTIN_DOMAINS)}) or file")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise DomainError(f"domain file {path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise DomainError(
            f"domain file {path}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        spec = DomainSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise DomainError(f"domain file {path}: {loc}: {err['msg']}{more}") from None
    domain = Domain(
        spec=spec, source=key if key in BUILTIN_DOMAINS else str(path), sha256=hashlib.sha256(raw).hexdigest()
    )
    try:
        _check_semantics(domain)
    except ValueError as e:
        raise DomainError(f"domain file {path}: {e}") from None
    return domain


def _check_semantics(d: Domain) -> None:
    """What the schema cannot say, checked in this order: priors, persona sentences, templates' fields,
    response lengths, and exact trait markers (ValueError naming the first problem)."""
    s = d.spec
    _check_priors(s)
    _check_persona(s)
    _check_fields(s.questions.topic, set(s.questions.slots), "questions.topic")
    for tpl in s.questions.templates:
        _check_fields(tpl, {"topic"}, "questions.templates")
    _check_lengths(s)
    _check_markers(d)


def _check_priors(s: DomainSpec) -> None:
    """Each conditional prior names an attribute and has one row of weights per value of it."""
    attrs = s.attributes
    for t in s.traits:
        if t.prior is None:
            continue
        if t.prior.given not in attrs:
            raise ValueError(f"trait {t.name!r}: prior.given names unknown attribute {t.prior.given!r}")
        want = set(attrs[t.prior.given].values)
        if set(t.prior.table) != want:
            missing = sorted(want - set(t.prior.table)) or sorted(set(t.prior.table) - want)
            raise ValueError(
                f"trait {t.name!r}: prior.table rows must match the values of {t.prior.given!r}; check {missing}"
            )
        for row_name, row in t.prior.table.items():
            if len(row) != len(t.values) or min(row) < 0 or sum(row) <= 0:
                raise ValueError(
                    f"trait {t.name!r}: prior row {row_name!r} needs {len(t.values)} non-negative weights"
                )


def _check_persona(s: DomainSpec) -> None:
    """The persona's sentences name known attributes and values; its intros only attribute fields."""
    attrs = s.attributes
    for attr, by_value in s.persona.attribute_sentences.items():
        if attr not in attrs:
            raise ValueError(f"persona.attribute_sentences names unknown attribute {attr!r}")
        unknown = set(by_value) - set(attrs[attr].values)
        if unknown:
            raise ValueError(f"persona.attribute_sentences.{attr}: unknown values {sorted(unknown)}")
    for tpl in s.persona.intro:
        _check_fields(tpl, set(attrs), "persona.intro")


def _check_lengths(s: DomainSpec) -> None:
    """At most one length and one layout trait, and room for one sentence per lexical trait."""
    kinds = [t.kind for t in s.traits]
    if kinds.count("length") > 1 or kinds.count("layout") > 1:
        raise ValueError("a domain has at most one length trait and one layout trait")
    n_lexical = kinds.count("lexical")
    length_min = min(
        (v.sentences[0] for t in s.traits if t.kind == "length" for v in t.values if v.sentences),
        default=s.response.sentences[0],
    )
    if length_min < n_lexical:
        raise ValueError(
            f"responses need at least {n_lexical} sentences (one per lexical trait); the shortest allowed is {length_min}"
        )


def _check_markers(d: Domain) -> None:
    """Exactness: each sentence is one sentence, and markers appear only where they belong."""
    s = d.spec
    pats = [(ti, vi, p) for ti, ps in enumerate(d.marker_patterns) if ps for vi, p in enumerate(ps)]

    def hits(text: str) -> set[tuple[int, int]]:
        return {(ti, vi) for ti, vi, p in pats if p.search(text)}

    for topic in d.topics:
        if hits(topic):
            raise ValueError(f"questions: topic {topic!r} contains a trait marker")
    for i, f in enumerate(s.response.filler):
        _one_sentence(f, f"response.filler[{i}]")
        if hits(f):
            raise ValueError(f"response.filler[{i}]: {f!r} contains a trait marker")
    for ti, t in enumerate(s.traits):
        if t.kind != "lexical":
            continue
        for vi, v in enumerate(t.values):
            for i, ph in enumerate(v.phrases):
                where = f"traits.{t.name}.{v.name}.phrases[{i}]"
                _one_sentence(ph, where)
                h = hits(ph)
                if (ti, vi) not in h:
                    raise ValueError(f"{where}: {ph!r} contains none of its markers")
                other = sorted(h - {(ti, vi)})
                if other:
                    oti, ovi = other[0]
                    raise ValueError(
                        f"{where}: {ph!r} also contains a marker of {s.traits[oti].name}={s.traits[oti].values[ovi].name}"
                    )


def _one_sentence(text: str, where: str) -> None:
    _check_fields(text, {"topic"}, where)
    if "\n" in text or count_sentences(text) != 1 or not _SENTENCE_END.search(text.rstrip()[-1:] + " "):
        raise ValueError(f"{where}: {text!r} must be exactly one sentence ending with . ! or ?")


_FIELD = re.compile(r"{([^{}]*)}")


def _check_fields(template: str, allowed: set[str], where: str) -> None:
    for name in _FIELD.findall(template):
        if name not in allowed:
            raise ValueError(
                f"{where}: {template!r} uses unknown field {{{name}}}; allowed: {sorted(allowed)}"
            )
