"""Writes of items and judgments: assigning pairs, recording picks, ratings and the survey, and storing a
participant's generated responses with the A/B items built from them.

Every judgment is recorded under a lock on its participant and only for the item the participant is on
(studyapp.flow), and is one-to-one with its item in the database, so a double-click or a replayed POST
records nothing twice. Recording returns False for such a replay; an item that is not the participant's,
or a value outside the allowed ones, raises ValidationError and changes nothing.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from studyapp.flow import Step, participant_next_step
from studyapp.models import Participant, Study
from studyapp.realtime import notify_participant_changed_on_commit, notify_study_on_commit
from studyapp.selectors import participant_for_update

from .models import (
    CandidatePair,
    ElicitationItem,
    ElicitationPick,
    GeneratedResponse,
    Question,
    Rating,
    RatingItem,
    Side,
    SurveyResponse,
)
from .pool import PoolRow

State = Participant.State
REASON_MAX_LENGTH = 500


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


def _check_choice(choice: str) -> None:
    if choice not in Side.values:
        raise ValidationError("Choose Response A or Response B.")


def elicitation_pick_record(*, participant: Participant, item_id: int, choice: str) -> bool:
    """Record the participant's pick on the pair they are on. The last pick moves them to the waiting
    page and enqueues `personalize` once the transaction commits."""
    _check_choice(choice)
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant.pk)
        item = ElicitationItem.objects.filter(participant=participant, pk=item_id).first()
        if item is None:
            raise ValidationError("This pair is not one of yours.")
        if ElicitationPick.objects.filter(item=item).exists():
            return False
        if participant_next_step(participant) != Step("elicitation", item.position):
            raise ValidationError("This pair is not the one to answer now.")
        now = timezone.now()
        ElicitationPick.objects.create(
            item=item, choice=choice, answered_at=now, elapsed_ms=_elapsed_ms(item.shown_at, now)
        )
        participant.picks_done += 1
        if participant.picks_done == participant.n_picks:
            participant.state, participant.generation = State.WAITING, Participant.Generation.QUEUED
            transaction.on_commit(partial(personalize_enqueue, participant.pk))
            notify_study_on_commit(participant.study_id)
        participant.save(update_fields=["picks_done", "state", "generation", "updated_at"])
        return True


def personalize_enqueue(participant_id: int) -> None:
    # Imported here: worker.tasks imports these services (the arrow is tasks -> services).
    from worker.tasks import personalize

    personalize.delay(participant_id)


def rating_record(
    *, participant: Participant, item_id: int, choice: str, strength: int, reason: str = ""
) -> bool:
    """Record the participant's rating of the A/B item they are on: the side that suits them, how strongly
    (1-5), and an optional one-sentence reason. The last rating moves them to the survey."""
    _check_choice(choice)
    if not isinstance(strength, int) or not 1 <= strength <= 5:
        raise ValidationError("Strength must be a whole number from 1 to 5.")
    reason = reason.strip()
    if len(reason) > REASON_MAX_LENGTH:
        raise ValidationError(f"Please keep the reason under {REASON_MAX_LENGTH} characters.")
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant.pk)
        item = RatingItem.objects.filter(participant=participant, pk=item_id).first()
        if item is None:
            raise ValidationError("This comparison is not one of yours.")
        if Rating.objects.filter(item=item).exists():
            return False
        if participant_next_step(participant) != Step("rating", item.position):
            raise ValidationError("This comparison is not the one to answer now.")
        now = timezone.now()
        Rating.objects.create(
            item=item,
            choice=choice,
            strength=strength,
            reason=reason,
            answered_at=now,
            elapsed_ms=_elapsed_ms(item.shown_at, now),
        )
        participant.ratings_done += 1
        if participant.ratings_done == participant.n_ratings:
            participant.state = State.SURVEY
        participant.save(update_fields=["ratings_done", "state", "updated_at"])
        notify_study_on_commit(participant.study_id)
        return True


SURVEY_FIELDS = ("self_description", "age_range", "gender", "education", "occupation", "comments")


def survey_record(*, participant: Participant, answers: dict[str, Any]) -> bool:
    """Store the closing survey (every answer optional) and complete the study."""
    unknown = set(answers) - set(SURVEY_FIELDS)
    if unknown:
        raise ValidationError(f"Unknown survey fields: {', '.join(sorted(unknown))}.")
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant.pk)
        if participant.state != State.SURVEY:
            return False
        now = timezone.now()
        survey = SurveyResponse(participant=participant, submitted_at=now, **answers)
        survey.full_clean(exclude=["participant"])
        survey.save()
        participant.state, participant.finished_at = State.COMPLETED, now
        participant.save(update_fields=["state", "finished_at", "updated_at"])
        notify_study_on_commit(participant.study_id)
        return True


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
    expected = [rng.choice(Side.values) for _ in range(attention_checks)]
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


def responses_store(*, participant_id: int, responses: Sequence[NewResponse]) -> bool:
    """Store a participant's generated responses (every arm on each of their evaluation questions, in the
    order the questions were asked), build their A/B items from the study's comparisons, and move them on
    to rating; their open pages are told once the transaction commits.

    Idempotent: returns False and stores nothing when the participant already has responses or is no
    longer waiting (e.g. withdrew while the worker ran)."""
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant_id)
        if participant is None or participant.state != State.WAITING:
            return False
        if GeneratedResponse.objects.filter(participant=participant).exists():
            return False
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
        response_id = {(row.arm_id, row.question_id): row.pk for row in rows}
        question_ids = list(dict.fromkeys(r.question_id for r in responses))
        study = participant.study
        pairs = []
        for comparison in study.comparisons.order_by("id"):
            for q in question_ids:
                missing = [
                    a for a in (comparison.arm_id, comparison.baseline_id) if (a, q) not in response_id
                ]
                if missing:
                    raise ValueError(
                        f"no response of arm {missing[0]} to question {q} for comparison {comparison}"
                    )
                pairs.append((q, response_id[comparison.arm_id, q], response_id[comparison.baseline_id, q]))
        plan = rating_items_plan(
            pairs,
            repeats=study.consistency_repeats,
            attention_checks=study.attention_checks,
            rng=random.Random(f"{participant.token}:ratings"),
        )
        _rating_items_create(participant, plan)
        participant.n_ratings, participant.ratings_done = len(plan), 0
        participant.state = State.RATING if plan else State.SURVEY
        participant.generation, participant.generation_error = Participant.Generation.READY, ""
        participant.save(
            update_fields=[
                "n_ratings",
                "ratings_done",
                "state",
                "generation",
                "generation_error",
                "updated_at",
            ]
        )
        notify_participant_changed_on_commit(participant)
        return True


def _rating_items_create(participant: Participant, plan: Sequence[PlannedItem]) -> None:
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
