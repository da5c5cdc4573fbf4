"""Row writers of items and judgments: the elicitation items a participant is assigned, the time an item
was first shown, the pick, rating and survey rows, the generated responses and the A/B items built from
them, the deletion of a participant's data, and the question pool's import.

They write rows and nothing else. A participant's state, the lock it is changed under, the check that a
judgment is for the step the participant is on, and the notifications are the business of the services
that call them (studyapp.services: participants, journey, personalization), inside their transaction.
"""

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from studyapp.models import Participant, Study

from .models import (
    CandidatePair,
    ElicitationItem,
    ElicitationPick,
    GeneratedResponse,
    Question,
    Rating,
    RatingItem,
    SurveyResponse,
)
from .plan import PlannedItem
from .pool import PoolRow


def _elapsed_ms(shown_at: datetime | None, answered_at: datetime) -> int | None:
    if shown_at is None:
        return None
    return max(0, round((answered_at - shown_at).total_seconds() * 1000))


def elicitation_items_assign(*, participant: Participant, rng: random.Random) -> int:
    """Draw the participant's pairs from the study's pool (`study.n_pairs`, or the whole pool if smaller),
    with order and sides from `rng`; returns how many. Runs inside the caller's transaction."""
    pool = CandidatePair.objects.filter(
        question__study=participant.study, question__use=Question.Use.ELICITATION
    )
    pair_ids = list(pool.order_by("id").values_list("id", flat=True))
    chosen = rng.sample(pair_ids, min(participant.study.n_pairs, len(pair_ids)))
    ElicitationItem.objects.bulk_create(
        ElicitationItem(participant=participant, pair_id=pair_id, position=i, a_on_left=rng.random() < 0.5)
        for i, pair_id in enumerate(chosen)
    )
    return len(chosen)


def item_mark_shown(*, item: ElicitationItem | RatingItem) -> None:
    """Record when an item was first shown (server clock); showing it again keeps the first time."""
    now = timezone.now()
    if type(item).objects.filter(pk=item.pk, shown_at__isnull=True).update(shown_at=now):
        item.shown_at = now


def elicitation_pick_create(*, item: ElicitationItem, choice: str) -> ElicitationPick:
    """The pick on `item`, answered now, with the time since the item was first shown."""
    now = timezone.now()
    return ElicitationPick.objects.create(
        item=item, choice=choice, answered_at=now, elapsed_ms=_elapsed_ms(item.shown_at, now)
    )


def rating_create(*, item: RatingItem, choice: str, strength: int, reason: str) -> Rating:
    """The rating of `item`, answered now, with the time since the item was first shown."""
    now = timezone.now()
    return Rating.objects.create(
        item=item,
        choice=choice,
        strength=strength,
        reason=reason,
        answered_at=now,
        elapsed_ms=_elapsed_ms(item.shown_at, now),
    )


def survey_create(*, participant: Participant, answers: Mapping[str, Any], submitted_at: datetime) -> None:
    """The participant's survey row; an answer the model refuses raises ValidationError."""
    survey = SurveyResponse(participant=participant, submitted_at=submitted_at, **answers)
    survey.full_clean(exclude=["participant"])
    survey.save()


def participant_data_delete(*, participant: Participant) -> None:
    """Delete every item and judgment of the participant: pairs and picks, generated responses, A/B
    items and ratings, survey (a withdrawal)."""
    RatingItem.objects.filter(participant=participant).delete()
    GeneratedResponse.objects.filter(participant=participant).delete()
    ElicitationItem.objects.filter(participant=participant).delete()
    SurveyResponse.objects.filter(participant=participant).delete()


@dataclass(frozen=True)
class NewResponse:
    """A generated response to store (what the worker got back from the model)."""

    arm_id: int
    question_id: int
    text: str
    user_description: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    finish_reason: str = ""


def generated_responses_create(
    *, participant: Participant, responses: Sequence[NewResponse]
) -> dict[tuple[int, int], int]:
    """Store the participant's generated responses; returns each row's id by (arm id, question id)."""
    rows = GeneratedResponse.objects.bulk_create(
        GeneratedResponse(
            participant=participant,
            arm_id=r.arm_id,
            question_id=r.question_id,
            text=r.text,
            user_description=r.user_description,
            prompt_tokens=r.prompt_tokens,
            new_tokens=r.new_tokens,
            finish_reason=r.finish_reason,
        )
        for r in responses
    )
    return {(row.arm_id, row.question_id): row.pk for row in rows}


def rating_items_create(*, participant: Participant, plan: Sequence[PlannedItem]) -> None:
    """The participant's A/B items, one per planned item, at its position in the plan."""

    def row(position: int, p: PlannedItem, repeat_of: RatingItem | None = None) -> RatingItem:
        return RatingItem(
            participant=participant,
            position=position,
            question_id=p.question_id,
            left_id=p.left,
            right_id=p.right,
            is_repeat=repeat_of is not None,
            repeat_of=repeat_of,
            is_attention_check=p.is_attention_check,
            expected_choice=p.expected_choice,
        )

    # Originals first: a repeat points at its original's row.
    firsts = RatingItem.objects.bulk_create(row(i, p) for i, p in enumerate(plan) if p.original is None)
    by_position = {item.position: item for item in firsts}
    RatingItem.objects.bulk_create(
        row(i, p, by_position[p.original]) for i, p in enumerate(plan) if p.original is not None
    )


@dataclass(frozen=True)
class PoolImported:
    """What question_pool_import added."""

    elicitation_pairs: int
    evaluation_questions: int
    skipped_duplicates: int = 0


def question_pool_import(*, study: Study, rows: Sequence[PoolRow], replace: bool = False) -> PoolImported:
    """Add rows to the study's question pool: a Question per distinct question, and a CandidatePair per
    elicitation row (elicitation rows with the same question text share one Question). An evaluation
    question the pool already holds is skipped.

    With `replace`, the current pool is deleted first. That is refused (ValidationError, nothing changes)
    once any participant has been shown pairs or been given responses from it: their data points at it."""
    with transaction.atomic():
        study = Study.objects.select_for_update().get(pk=study.pk)
        if replace:
            _pool_delete(study)
        questions = {
            (q.use, q.text): q for q in Question.objects.filter(study=study).only("id", "use", "text")
        }
        pairs, added_evaluation, skipped = [], 0, 0
        for row in rows:
            question = questions.get((row.kind, row.question))
            if question is not None and row.kind == Question.Use.EVALUATION:
                skipped += 1
                continue
            if question is None:
                question = Question.objects.create(
                    study=study, use=row.kind, text=row.question, topic=row.topic, source_id=row.source_id
                )
                questions[row.kind, row.question] = question
                added_evaluation += row.kind == Question.Use.EVALUATION
            if row.kind == Question.Use.ELICITATION:
                pairs.append(
                    CandidatePair(question=question, response_a=row.response_a, response_b=row.response_b)
                )
        CandidatePair.objects.bulk_create(pairs)
        return PoolImported(
            elicitation_pairs=len(pairs), evaluation_questions=added_evaluation, skipped_duplicates=skipped
        )


def _pool_delete(study: Study) -> None:
    """Delete the study's pool, refused once a participant has been shown it."""
    shown = (
        Participant.objects.filter(study=study)
        .filter(Q(elicitation_items__isnull=False) | Q(responses__isnull=False))
        .distinct()
        .count()
    )
    if shown:
        raise ValidationError(
            f"{shown} participant(s) have already been shown this pool, so it can no longer be "
            "replaced; add to it instead."
        )
    Question.objects.filter(study=study).delete()


# A judgment imported from elsewhere has no strength: the middle of the scale stands in for it.
IMPORTED_STRENGTH = 3


@dataclass(frozen=True)
class ImportedRating:
    """A judgment made outside the site (an imported crowd): the question, each side's arm and response
    text, the side chosen, or "" for a tie, and the judgment it repeats (an index in the same list)."""

    question_id: int
    left_arm_id: int
    left_text: str
    right_arm_id: int
    right_text: str
    choice: str  # Side, or "" for a tie
    repeat_of: int | None = None


def imported_ratings_create(
    *, participant: Participant, ratings: Sequence[ImportedRating], answered_at: datetime
) -> int:
    """Store judgments made outside the site as the participant's rows: each arm's response to each
    question (one GeneratedResponse), an A/B item per judgment at its position in `ratings`, and a Rating
    (strength IMPORTED_STRENGTH, no timing) on each item that chose a side. A tie stays an item shown and
    never rated: a Rating always has a side. Returns how many ratings were written."""
    texts = {(r.left_arm_id, r.question_id): r.left_text for r in ratings}
    texts |= {(r.right_arm_id, r.question_id): r.right_text for r in ratings}
    ids = generated_responses_create(
        participant=participant,
        responses=[NewResponse(arm_id=a, question_id=q, text=t) for (a, q), t in texts.items()],
    )

    def item(position: int, r: ImportedRating, original: RatingItem | None = None) -> RatingItem:
        return RatingItem(
            participant=participant,
            position=position,
            question_id=r.question_id,
            left_id=ids[r.left_arm_id, r.question_id],
            right_id=ids[r.right_arm_id, r.question_id],
            is_repeat=original is not None,
            repeat_of=original,
        )

    # Originals first: a repeat points at its original's row.
    items = {
        i: row
        for i, row in zip(
            [i for i, r in enumerate(ratings) if r.repeat_of is None],
            RatingItem.objects.bulk_create(item(i, r) for i, r in enumerate(ratings) if r.repeat_of is None),
            strict=True,
        )
    }
    repeats = [(i, r.repeat_of) for i, r in enumerate(ratings) if r.repeat_of is not None]
    made = RatingItem.objects.bulk_create(item(i, ratings[i], items[of]) for i, of in repeats)
    items |= dict(zip([i for i, _ in repeats], made, strict=True))
    decided = [
        Rating(item=items[i], choice=r.choice, strength=IMPORTED_STRENGTH, answered_at=answered_at)
        for i, r in enumerate(ratings)
        if r.choice
    ]
    Rating.objects.bulk_create(decided)
    return len(decided)
