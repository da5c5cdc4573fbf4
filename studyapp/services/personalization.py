"""A participant's personalization, from the last pick to stored responses: enqueued on commit, started
and failed by the worker, retried by a coordinator, and stored with the participant's A/B items.

Every change locks the participant (selectors.participant_for_update), checks that the news still
concerns them (they wait, their responses are not stored), changes their generation status and tells
their open pages and the study's dashboards once the transaction commits.

The queue is written to only after the commit (queue.enqueue from an on_commit callback), and a
generation is marked sent (`generation_sent_at`) once the broker has taken its task. No participant is
left waiting on work that is not happening:
- the broker could not take the task (down, or the web process died before sending): the generation
  stays queued but unsent, their page says it is delayed, and the stale-work sweeper (generations_recover,
  run by beat) sends it once the broker is back;
- the worker died while generating (SIGKILL, a lost host): a running generation beats every few seconds
  (participant_generations_heartbeat); one silent for settings.STALE_WORK_AFTER_S is queued again by the
  sweeper, and the next free worker takes it;
- either way a coordinator can also retry it at once (Participant.may_retry_generation).
Only a queued generation is started (participant_generation_start), and responses are stored once
(responses_store), so a redelivered or duplicate task never writes a second set.

A worker that starts a participant's generation also claims the study's other participants waiting at that
moment (participant_generations_claim, up to settings.PERSONALIZE_BATCH_MAX in all) and generates them in
one batch: their generations run, beat and are stored exactly as if their own tasks had started them, and
those tasks, when delivered, find them running or ready and skip. A batch that fails puts each claimed
participant back in the queue with a task of its own (participant_generation_requeue); a participant whose
generation has failed once generates alone from then on, so one bad request spoils no other batch.
"""

import logging
import random
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Case, F, Q, TextField, Value, When
from django.utils import timezone

from annotation.plan import comparison_pairs, rating_items_plan
from annotation.writers import NewResponse, generated_responses_create, rating_items_create
from studyapp import queue
from studyapp.models import Participant, stale_work_cutoff
from studyapp.realtime import notify_participant_changed_on_commit
from studyapp.selectors import participant_for_update

from .participants import participant_locked

State = Participant.State
Generation = Participant.Generation
logger = logging.getLogger(__name__)

__all__ = [
    "NewResponse",
    "generations_recover",
    "participant_generation_fail",
    "participant_generation_queue",
    "participant_generation_requeue",
    "participant_generation_retry",
    "participant_generation_retry_later",
    "participant_generation_sent",
    "participant_generation_start",
    "participant_generations_claim",
    "participant_generations_heartbeat",
    "personalize_enqueue",
    "responses_store",
]


def participant_generation_queue(participant: Participant) -> None:
    """Queue the (locked) participant's generation: `personalize` is enqueued once the transaction
    commits. The caller saves `generation` (and the fields below) with its own changes."""
    participant.generation = Generation.QUEUED
    participant.generation_sent_at = participant.generation_heartbeat_at = None
    transaction.on_commit(partial(personalize_enqueue, participant.pk))


GENERATION_QUEUE_FIELDS = ["generation", "generation_sent_at", "generation_heartbeat_at"]


def personalize_enqueue(participant_id: int) -> None:
    """Send `personalize` for the participant (an on_commit callback) and mark their generation sent.
    When the broker cannot take it, the generation stays queued and unsent, with the broker's error
    (Participant.NOT_SENT...): their page says it is delayed, and generations_recover sends it once the
    broker is back."""
    queued = Participant.objects.filter(pk=participant_id, generation=Generation.QUEUED)
    try:
        queue.enqueue(queue.PERSONALIZE, participant_id)
    except queue.QueueUnavailable as exc:
        logger.error(
            "personalize(%s) was not enqueued (it will be once the broker is back): %s", participant_id, exc
        )
        queued.filter(generation_sent_at__isnull=True).update(generation_error=f"{Participant.NOT_SENT}{exc}")
        if participant := Participant.objects.filter(pk=participant_id).first():
            notify_participant_changed_on_commit(participant)  # their page says it is delayed
        return
    participant_generation_sent(participant_id=participant_id)


def participant_generation_sent(*, participant_id: int) -> None:
    """The broker has taken the participant's task (personalize_enqueue, or a worker's retry): their
    queued generation is marked sent, and a not-sent error cleared. A generation that has moved on (a
    worker already started it) is left as it is."""
    not_sent_error = Q(generation_error__startswith=Participant.NOT_SENT)
    Participant.objects.filter(pk=participant_id, generation=Generation.QUEUED).update(
        generation_sent_at=timezone.now(),
        generation_error=Case(
            When(not_sent_error, then=Value("")), default=F("generation_error"), output_field=TextField()
        ),
    )


def _awaits_responses(participant: Participant) -> bool:
    """Whether a worker's news about the participant's responses still concerns them: they wait, and
    have no stored responses yet."""
    return participant.state == State.WAITING and participant.generation != Generation.READY


def participant_generation_start(*, participant_id: int) -> bool:
    """A worker has started on the participant's responses; False when there is nothing to do for them:
    gone, withdrawn, their responses are stored, or another worker is writing them (only a queued
    generation starts: a duplicate or redelivered task finds it running or ready)."""
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant_id)
        if (
            participant is None
            or participant.state != State.WAITING
            or participant.generation != Generation.QUEUED
        ):
            return False
        participant.generation, participant.generation_heartbeat_at = Generation.RUNNING, timezone.now()
        participant.save(update_fields=["generation", "generation_heartbeat_at", "updated_at"])
        notify_participant_changed_on_commit(participant)
        return True


def participant_generations_claim(*, participant_id: int, limit: int) -> list[int]:
    """Start, in the same batch as the participant whose generation a worker has just started, up to
    `limit` other participants of their study who wait at this moment (queued, oldest first); returns
    their ids. Only a first attempt is batched (no error, or only the note that the broker has not taken
    its task yet): none when the participant's own generation has failed before, and never one that has.
    Rows locked at this instant are skipped (SKIP LOCKED): another worker's start or claim, or the web
    process marking a task sent. So two GPU workers never claim the same participant, nor wait on each
    other; a participant skipped so is generated by their own task."""
    if limit < 1:
        return []
    first_attempt = Q(generation_error="") | Q(generation_error__startswith=Participant.NOT_SENT)
    with transaction.atomic():
        lead = participant_for_update(participant_id=participant_id)
        if lead is None or lead.generation != Generation.RUNNING or lead.generation_error:
            return []
        waiting = (
            Participant.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(first_attempt, study_id=lead.study_id, state=State.WAITING, generation=Generation.QUEUED)
            .exclude(pk=lead.pk)
            .order_by("updated_at", "pk")
        )
        claimed = list(waiting[:limit])
        for participant in claimed:
            participant.generation, participant.generation_heartbeat_at = Generation.RUNNING, timezone.now()
            participant.save(update_fields=["generation", "generation_heartbeat_at", "updated_at"])
            notify_participant_changed_on_commit(participant)
        return [p.pk for p in claimed]


def participant_generations_heartbeat(*, participant_ids: Sequence[int]) -> None:
    """The worker writing these participants' responses (one generation, or a batch) is alive (every
    settings.HEARTBEAT_INTERVAL_S)."""
    Participant.objects.filter(pk__in=list(participant_ids), generation=Generation.RUNNING).update(
        generation_heartbeat_at=timezone.now()
    )


def participant_generation_requeue(*, participant_id: int, error: str) -> bool:
    """A batch the participant was claimed into failed: their running generation is queued again, with
    a task of its own enqueued on commit (their first one may already have been delivered and skipped),
    and `error` kept, so it generates alone (participant_generations_claim). A generation that has moved
    on (stored, or the participant withdrew) is left as it is; returns whether it was queued again."""
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant_id)
        if participant is None or participant.generation != Generation.RUNNING:
            return False
        _generation_queue_again(participant, error)
        return True


def participant_generation_retry_later(*, participant_id: int, error: str) -> None:
    """An attempt failed and its task is about to be retried: queued again (not yet sent), before the
    worker sends the retry, so the retried task finds it queued however soon it runs; the worker then
    marks it sent (participant_generation_sent). Should the retry never reach the broker, the sweeper
    sends it (generations_recover)."""
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant_id)
        if participant is None or participant.generation != Generation.RUNNING:
            return
        participant.generation, participant.generation_error = Generation.QUEUED, f"retrying after: {error}"
        participant.generation_sent_at = participant.generation_heartbeat_at = None
        participant.save(update_fields=[*GENERATION_QUEUE_FIELDS, "generation_error", "updated_at"])
        notify_participant_changed_on_commit(participant)


def generations_recover(*, now: datetime | None = None) -> dict[str, int]:
    """The stale-work sweeper's part for generations (run by beat, and when a worker starts): a running
    generation with no heartbeat for settings.STALE_WORK_AFTER_S lost its worker and is queued again;
    a queued one never handed to the broker (for longer than a few seconds) is sent. Each participant is
    checked again under their lock. Returns how many of each."""
    now = now or timezone.now()
    stale = stale_work_cutoff(now)
    waiting = Participant.objects.filter(state=State.WAITING)
    lost = waiting.filter(generation=Generation.RUNNING, generation_heartbeat_at__lt=stale)
    unsent = waiting.filter(
        generation=Generation.QUEUED,
        generation_sent_at__isnull=True,
        updated_at__lt=now - Participant.UNSENT_GRACE,
    )
    counts = {"requeued": 0, "sent": 0}
    for participant_id in lost.values_list("pk", flat=True):
        counts["requeued"] += _generation_requeue(participant_id, stale, "its worker was lost")
    for participant_id in unsent.values_list("pk", flat=True):
        personalize_enqueue(participant_id)
        counts["sent"] += 1
    return counts


def _generation_requeue(participant_id: int, stale: datetime, why: str) -> int:
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant_id)
        if participant is None or not participant.generation_is_stuck(stale=stale):
            return 0
        logger.warning("participant %s: generation queued again (%s)", participant_id, why)
        _generation_queue_again(participant, f"queued again: {why}")
        return 1


def _generation_queue_again(participant: Participant, error: str) -> None:
    """Queue the locked participant's generation again (personalize enqueued on commit), with `error`;
    their page is told."""
    participant_generation_queue(participant)
    participant.generation_error = error
    participant.save(update_fields=[*GENERATION_QUEUE_FIELDS, "generation_error", "updated_at"])
    notify_participant_changed_on_commit(participant)


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
    """Run a participant's generation again after it failed for good, or when it is stuck (queued but
    never sent, or running with no sign of life: Participant.generation_is_stuck): a coordinator's retry,
    e.g. once the model's problem is fixed, or the broker is back. Back to queued, `personalize` enqueued
    once the transaction commits, and their waiting page told, so it moves on by itself when the
    responses are ready.

    Only then (Participant.may_retry_generation), so a second click while the first retry is queued
    or running is refused with ValidationError and enqueues nothing."""
    with transaction.atomic():
        participant = participant_locked(participant)
        if not participant.may_retry_generation:
            raise ValidationError(
                "Only a generation that has failed or is stuck can be retried; this participant's is "
                f"{participant.generation} (state {participant.state})."
            )
        participant_generation_queue(participant)
        participant.generation_error = ""
        participant.save(update_fields=[*GENERATION_QUEUE_FIELDS, "generation_error", "updated_at"])
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
