"""A participant's blind A/B items, planned before any row is written: which responses each item pairs,
on which side, in which order, with the consistency repeats and attention checks mixed in.

Pure Python (no database): the same plan comes out of the same inputs and the same random draws, and
annotation.writers.rating_items_create turns it into rows.
"""

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

# annotation.models.Side's values, in its order: an attention check draws the side it asks for from
# this sequence, so the order is part of every plan's random draws.
SIDES = ("left", "right")


@dataclass(frozen=True)
class PlannedItem:
    """One A/B item in the order it will be shown. `left`/`right` are response ids (None for an
    attention check); `original` is the index in the plan of the item a repeat repeats."""

    question_id: int | None
    left: int | None
    right: int | None
    original: int | None = None
    expected_choice: str = ""

    @property
    def is_attention_check(self) -> bool:
        return bool(self.expected_choice)


class ComparisonArms(Protocol):
    """What the plan needs of a study's comparison (a studyapp.models.Comparison row): the arm and its
    baseline; its str() names it in an error."""

    arm_id: int
    baseline_id: int


def comparison_pairs(
    comparisons: Sequence[ComparisonArms],
    question_ids: Sequence[int],
    response_id: Mapping[tuple[int, int], int],
) -> list[tuple[int, int, int]]:
    """(question id, arm response id, baseline response id) for each comparison on each question, in
    that order, from `response_id[arm id, question id]`. A response missing for either arm raises
    ValueError."""
    pairs = []
    for comparison in comparisons:
        for q in question_ids:
            missing = [a for a in (comparison.arm_id, comparison.baseline_id) if (a, q) not in response_id]
            if missing:
                raise ValueError(
                    f"no response of arm {missing[0]} to question {q} for comparison {comparison}"
                )
            pairs.append((q, response_id[comparison.arm_id, q], response_id[comparison.baseline_id, q]))
    return pairs


def rating_items_plan(
    pairs: Sequence[tuple[int, int, int]], *, repeats: int, attention_checks: int, rng: random.Random
) -> list[PlannedItem]:
    """The participant's A/B items, in order, from (question id, arm response id, baseline response id).

    Each pair's sides are drawn at random and the pairs shuffled; `repeats` of them are shown once more,
    sides swapped, somewhere after the original; `attention_checks` checks (each asking for a random side)
    go anywhere but first."""
    originals = []
    for question_id, arm_response, baseline_response in pairs:
        left, right = (
            (arm_response, baseline_response) if rng.random() < 0.5 else (baseline_response, arm_response)
        )
        originals.append(PlannedItem(question_id, left, right))
    rng.shuffle(originals)
    # The order as keys first (("pair", i), ("repeat", i) of originals[i], ("check", k)), so that a repeat
    # can find its original's final position once every insertion is done.
    order: list[tuple[str, int]] = [("pair", i) for i in range(len(originals))]
    for i in rng.sample(range(len(originals)), min(repeats, len(originals))):
        order.insert(rng.randint(order.index(("pair", i)) + 1, len(order)), ("repeat", i))
    expected = [rng.choice(SIDES) for _ in range(attention_checks)]
    for k in range(attention_checks):
        order.insert(rng.randint(min(1, len(order)), len(order)), ("check", k))
    position = {key: n for n, key in enumerate(order)}
    plan = []
    for kind, i in order:
        if kind == "pair":
            plan.append(originals[i])
        elif kind == "repeat":
            o = originals[i]
            plan.append(PlannedItem(o.question_id, o.right, o.left, original=position["pair", i]))
        else:
            plan.append(PlannedItem(None, None, None, expected_choice=expected[i]))
    return plan
