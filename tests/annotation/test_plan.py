import random

from annotation.models import Side
from annotation.plan import SIDES, PlannedItem, rating_items_plan

PAIRS = [(q, 100 + q, 200 + q) for q in range(6)]  # (question, arm response, baseline response)


def plan(seed: int = 0, *, repeats: int = 2, attention_checks: int = 2) -> list[PlannedItem]:
    return rating_items_plan(
        PAIRS, repeats=repeats, attention_checks=attention_checks, rng=random.Random(seed)
    )


def test_it_shows_every_comparison_once_with_its_sides_recorded() -> None:
    items = plan(repeats=0, attention_checks=0)

    assert sorted((p.question_id, *sorted((p.left, p.right))) for p in items) == PAIRS


def test_it_randomizes_which_side_each_arm_is_shown_on() -> None:
    arm_on_left = [
        p.left == 100 + p.question_id
        for seed in range(20)
        for p in plan(seed, repeats=0)
        if not p.is_attention_check
    ]

    assert 0 < sum(arm_on_left) < len(arm_on_left)


def test_it_repeats_pairs_later_with_sides_swapped() -> None:
    for seed in range(20):
        items = plan(seed)
        repeats = [(i, p) for i, p in enumerate(items) if p.original is not None]
        assert len(repeats) == 2
        for i, repeat in repeats:
            original = items[repeat.original]
            assert repeat.original < i
            assert (repeat.question_id, repeat.left, repeat.right) == (
                original.question_id,
                original.right,
                original.left,
            )


def test_it_mixes_in_attention_checks_never_first() -> None:
    for seed in range(20):
        items = plan(seed)
        checks = [i for i, p in enumerate(items) if p.is_attention_check]
        assert len(checks) == 2 and 0 not in checks
        assert all(items[i].left is None and items[i].expected_choice in ("left", "right") for i in checks)


def test_its_sides_are_the_models_sides_in_the_same_order() -> None:
    assert tuple(Side.values) == SIDES
