import random

import pytest
from django.core.exceptions import ValidationError

from annotation.models import GeneratedResponse, Question, RatingItem
from annotation.pool import PoolRow
from annotation.services import PlannedItem, question_pool_import, rating_items_plan, responses_store
from studyapp.models import Participant
from studyapp.services import participant_withdraw
from tests.factories import fake_responses, make_study, participant_rating, participant_waiting

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


@pytest.mark.django_db
def test_it_stores_a_participants_responses_and_items_only_once() -> None:
    participant = participant_rating(make_study())
    items = list(RatingItem.objects.filter(participant=participant).values_list("pk", flat=True))

    stored_again = responses_store(participant_id=participant.pk, responses=fake_responses(participant))

    assert not stored_again
    assert GeneratedResponse.objects.filter(participant=participant).count() == 2 * 2  # arms x questions
    assert list(RatingItem.objects.filter(participant=participant).values_list("pk", flat=True)) == items


@pytest.mark.django_db
def test_it_moves_the_participant_to_rating_with_every_item_counted() -> None:
    participant = participant_rating(make_study())

    assert participant.state == Participant.State.RATING
    assert participant.generation == Participant.Generation.READY
    # 2 questions x 1 comparison, 1 consistency repeat, 1 attention check
    assert participant.n_ratings == RatingItem.objects.filter(participant=participant).count() == 4


@pytest.mark.django_db
def test_it_stores_nothing_for_a_participant_who_withdrew_while_generating() -> None:
    participant = participant_waiting(make_study())
    responses = fake_responses(participant)
    participant_withdraw(participant=participant)

    assert not responses_store(participant_id=participant.pk, responses=responses)
    assert not GeneratedResponse.objects.exists()


@pytest.mark.django_db
def test_it_refuses_to_replace_a_pool_that_participants_have_seen() -> None:
    study = make_study()
    participant_waiting(study)
    before = sorted(Question.objects.filter(study=study).values_list("text", flat=True))

    with pytest.raises(ValidationError, match="1 participant"):
        question_pool_import(study=study, rows=[PoolRow("evaluation", "A new question?")], replace=True)

    assert sorted(Question.objects.filter(study=study).values_list("text", flat=True)) == before


@pytest.mark.django_db
def test_it_adds_pairs_to_an_elicitation_question_the_pool_already_holds() -> None:
    study = make_study(n_pairs=1)
    text = Question.objects.filter(study=study, use="elicitation").first().text
    rows = [
        PoolRow("elicitation", text, "One more.", "And another."),
        PoolRow("evaluation", "Evaluation question 0?"),
    ]

    added = question_pool_import(study=study, rows=rows)

    assert (added.elicitation_pairs, added.evaluation_questions, added.skipped_duplicates) == (1, 0, 1)
    assert Question.objects.get(study=study, text=text).candidate_pairs.count() == 2
