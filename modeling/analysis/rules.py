"""Which participants the analyses count: declared exclusion rules, applied once, shown beside every
result with how many participants each rule left out."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .data import StudyData

# Finished without completing, judgments kept (studyapp.models.Participant.EXCLUDED_STATES).
EXCLUDED_STATES = ("returned", "timed_out")


@dataclass(frozen=True)
class ExclusionRules:
    """The rules, declared up front. `too_fast_ms` None takes the export's threshold (its
    participants.too_fast_ms); 0 turns the rule off.

    - drop_returned: participants the recruitment platform returned or who timed out (as the studio does);
    - drop_failed_attention: more failed attention checks than the study allows;
    - drop_too_fast: a median A/B answer time (attention checks excluded) under `too_fast_ms`; a
      participant without a timed answer is kept;
    - completed_only: only participants who completed the study (off: in-progress answers count)."""

    drop_returned: bool = True
    drop_failed_attention: bool = True
    drop_too_fast: bool = True
    too_fast_ms: int | None = None
    completed_only: bool = False

    def __post_init__(self) -> None:
        if self.too_fast_ms is not None and self.too_fast_ms < 0:
            raise ValueError(f"the too-fast threshold must be 0 ms or more, not {self.too_fast_ms}")


@dataclass(frozen=True)
class Rule:
    """One rule as applied: what it says, whether it is on, and whom it left out."""

    key: str
    text: str
    active: bool
    excluded: tuple[str, ...] = ()

    @property
    def line(self) -> str:
        if not self.active:
            return f"{self.text}: not applied."
        return f"{self.text}: {len(self.excluded)} excluded."


SHORT = {
    "returned": "returned or timed out",
    "failed_attention": "failed attention",
    "too_fast": "too fast",
    "not_completed": "not completed",
}


@dataclass(frozen=True)
class Selection:
    """The participants the analyses count (`included`, pseudonyms) and the rules that chose them."""

    included: frozenset[str]
    rules: tuple[Rule, ...]
    participants: int  # in the export
    too_fast_ms: int
    excluded_by: dict[str, tuple[str, ...]] = field(default_factory=dict)  # pseudonym -> rule keys

    @property
    def lines(self) -> list[str]:
        """The rules, as shown beside each result."""
        return [
            *(r.line for r in self.rules),
            f"Counted: {len(self.included)} of {self.participants} exported participants.",
        ]

    @property
    def summary(self) -> str:
        """One line: who is counted and how many each rule left out."""
        left_out = [f"{len(r.excluded)} {SHORT[r.key]}" for r in self.rules if r.active and r.excluded]
        return f"Counted {len(self.included)} of {self.participants} exported participants" + (
            f" (left out: {', '.join(left_out)})." if left_out else "."
        )

    def to_json(self) -> dict[str, object]:
        return {
            "participants": self.participants,
            "included": len(self.included),
            "too_fast_ms": self.too_fast_ms,
            "rules": [
                {"key": r.key, "text": r.text, "active": r.active, "excluded": len(r.excluded)}
                for r in self.rules
            ],
        }


def _threshold(data: StudyData, rules: ExclusionRules) -> int:
    if rules.too_fast_ms is not None:
        return rules.too_fast_ms
    known = data.participants["too_fast_ms"].dropna()
    return int(known.iloc[0]) if len(known) else int(data.study["too_fast_ms"])


def select_participants(data: StudyData, rules: ExclusionRules) -> Selection:
    """Apply `rules` to the participants table. A participant may break several rules; each rule counts
    everyone it applies to, and `included` is who breaks none."""
    p = data.participants
    threshold = _threshold(data, rules)
    allowed = int(data.study["attention_failures_allowed"])
    failures = p["attention_failures"].fillna(0)
    median = p["median_rating_ms"]
    tests = [
        (
            "returned",
            "Returned to the recruitment platform or timed out (the studio's rule)",
            rules.drop_returned,
            p["state"].isin(EXCLUDED_STATES),
        ),
        (
            "failed_attention",
            f"Failed attention: more than {allowed} failed attention check{'s' if allowed != 1 else ''} "
            "(the study's setting)",
            rules.drop_failed_attention,
            failures > p["attention_failures_allowed"].fillna(allowed),
        ),
        (
            "too_fast",
            f"Too fast: median time per A/B answer under {threshold:,} ms (attention checks excluded; "
            "participants without a timed answer kept)",
            rules.drop_too_fast and threshold > 0,
            median.notna() & (median < threshold),
        ),
        (
            "not_completed",
            "Not completed: still in progress or left early",
            rules.completed_only,
            ~p["complete"].fillna(False).astype(bool),
        ),
    ]
    applied: list[Rule] = []
    excluded_by: dict[str, tuple[str, ...]] = {}
    dropped = pd.Series(False, index=p.index)
    for key, text, active, hit in tests:
        hit = hit.fillna(False).astype(bool)
        who = tuple(p.loc[hit, "participant"]) if active else ()
        applied.append(Rule(key, text, active, who))
        if active:
            dropped |= hit
            for pseudonym in who:
                excluded_by.setdefault(pseudonym, ())
                excluded_by[pseudonym] += (key,)
    return Selection(
        included=frozenset(p.loc[~dropped, "participant"]),
        rules=tuple(applied),
        participants=len(p),
        too_fast_ms=threshold,
        excluded_by=excluded_by,
    )
