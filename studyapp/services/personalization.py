"""A participant's personalization, from the last pick to stored responses: enqueued on commit, started
and failed by the worker, retried by a coordinator, and stored with the participant's A/B items.

Every change locks the participant (selectors.participant_for_update), checks that the news still
concerns them (they wait, their responses are not stored), changes their generation status and tells
their open pages and the study's dashboards once the transaction commits.

The queue is written to only after the commit (queue.enqueue from an on_commit callback). A broker that
cannot take the task marks the generation failed, with the broker's error: the participant's page says
so, and a coordinator's retry enqueues it again once the broker is back. No participant waits on a task
that was never queued.
"""

import logging
import random
from collections.abc import Callable, Sequence
from functools import partial

from django.core.exceptions import ValidationError
from django.db import transaction

from annotation.plan import comparison_pairs, rating_items_plan
from annotation.writers import NewResponse, generated_responses_create, rating_items_create
from studyapp import queue
from studyapp.models import Participant
from studyapp.realtime import notify_participant_changed_on_commit
from studyapp.selectors import participant_for_update

from .participants import participant_locked

State = Participant.State
Generation = Participant.Generation
logger = logging.getLogger(__name__)

__all__ = [
    "NewResponse",
    "participant_generation_fail",
    "participant_generation_queue",
    "participant_generation_retry",
    "participant_generation_start",
    "personalize_enqueue",
    "responses_store",
]


def participant_generation_queue(participant: Participant) -> None:
    """Queue the (locked) participant's generation: `personalize` is enqueued once the transaction
    commits. The caller saves `generation` with its own changes."""
    participant.generation = Generation.QUEUED
    transaction.on_commit(partial(personalize_enqueue, participant.pk))


def personalize_enqueue(participant_id: int) -> None:
    """Send `personalize` for the participant (an on_commit callback). When the broker cannot take it,
    their generation is marked failed with the broker's error instead of leaving them queued."""
    try:
        queue.enqueue(queue.PERSONALIZE, participant_id)
    except queue.QueueUnavailable as exc:
        logger.error("personalize(%s) was not enqueued: %s", participant_id, exc)
        _generation_not_queued(participant_id, str(exc))


def _generation_not_queued(participant_id: int, error: str) -> None:
    """The participant's queued generation was never enqueued: it failed (a coordinator can retry it),
    unless a worker has already moved it on."""
    _generation_failed(
        participant_id, error, lambda p: (p.state, p.generation) == (State.WAITING, Generation.QUEUED)
    )


def _awaits_responses(participant: Participant) -> bool:
    """Whether a worker's news about the participant's responses still concerns them: they wait, and
    have no stored responses yet."""
    return participant.state == State.WAITING and participant.generation != Generation.READY


def participant_generation_start(*, participant_id: int) -> bool:
    """A worker has started on the participant's responses; False when there is nothing to do for them
    (gone, withdrawn, or their responses are already stored)."""
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant_id)
        if participant is None or not _awaits_responses(participant):
            return False
        participant.generation = Generation.RUNNING
        participant.save(update_fields=["generation", "updated_at"])
        notify_participant_changed_on_commit(participant)
        return True


def participant_generation_fail(*, participant_id: int, error: str) -> None:
    """Generation failed for good: the participant's page says so, and coordinators see `error`."""
    _generation_failed(participant_id, error, _awaits_responses)


def _generation_failed(participant_id: int, error: str, concerns: Callable[[Participant], bool]) -> None:
    """Mark the participant's generation failed with `error`, under their lock, if `concerns` them
    still holds; their page and the dashboards are told on commit."""
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant_id)
        if participant is None or not concerns(participant):
            return
        participant.generation, participant.generation_error = Generation.FAILED, error
        participant.save(update_fields=["generation", "generation_error", "updated_at"])
        notify_participant_changed_on_commit(participant)


def participant_generation_retry(*, participant: Participant) -> Participant:
    """Run a participant's generation again after it failed for good (a coordinator's retry, e.g. once
    the model's problem is fixed, or the broker is back): back to queued, `personalize` enqueued once the
    transaction commits, and their waiting page told, so it moves on by itself when the responses are
    ready.

    Only from a failed generation (Participant.may_retry_generation), so a second click while the first
    retry is queued or running is refused with ValidationError and enqueues nothing."""
    with transaction.atomic():
        participant = participant_locked(participant)
        if not participant.may_retry_generation:
            raise ValidationError(
                "Only a generation that has failed can be retried; this participant's is "
                f"{participant.generation} (state {participant.state})."
            )
        participant_generation_queue(participant)
        participant.generation_error = ""
        participant.save(update_fields=["generation", "generation_error", "updated_at"])
        notify_participant_changed_on_commit(participant)
        return participant


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
        if participant.responses.exists():
            return False
        response_id = generated_responses_create(participant=participant, responses=responses)
        study = participant.study
        question_ids = list(dict.fromkeys(r.question_id for r in responses))
        pairs = comparison_pairs(list(study.comparisons.order_by("id")), question_ids, response_id)
        plan = rating_items_plan(
            pairs,
            repeats=study.consistency_repeats,
            attention_checks=study.attention_checks,
            rng=random.Random(f"{participant.token}:ratings"),
        )
        rating_items_create(participant=participant, plan=plan)
        participant.n_ratings, participant.ratings_done = len(plan), 0
        participant.state = State.RATING if plan else State.SURVEY
        participant.generation, participant.generation_error = Generation.READY, ""
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
