import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from annotation.models import ElicitationPick, GeneratedResponse, Rating, SurveyResponse
from studyapp.models import Job, Participant
from studyapp.services import (
    ArmSpec,
    elicitation_pick_record,
    generations_recover,
    job_enqueue,
    job_start,
    jobs_recover,
    participant_consent,
    participant_generation_fail,
    participant_generation_requeue,
    participant_generation_retry,
    participant_generation_start,
    participant_generations_claim,
    participant_generations_heartbeat,
    participant_mark_returned,
    participant_withdraw,
    participants_expire,
    personalize_enqueue,
    recruitment_id_hash,
    responses_store,
    study_update,
    survey_record,
)
from tests.factories import (
    fake_responses,
    make_job,
    make_participant,
    make_study,
    participant_at_elicitation,
    participant_rating,
    participant_waiting,
    pick,
    rate,
    rate_all,
)

State, Generation = Participant.State, Participant.Generation


def test_it_hashes_recruitment_ids_with_the_participant_id_key(settings) -> None:
    settings.PARTICIPANT_ID_KEY = "key-one"
    under_one = recruitment_id_hash("5f1a2b")
    settings.PARTICIPANT_ID_KEY = "key-two"

    assert under_one == hmac.new(b"key-one", b"5f1a2b", hashlib.sha256).hexdigest()
    assert recruitment_id_hash("5f1a2b") != under_one


@pytest.mark.django_db
def test_it_ignores_a_replayed_consent_once_the_participant_has_moved_on() -> None:
    participant = make_participant(make_study())
    participant_consent(participant=participant, agreed=True)

    participant_consent(participant=participant, agreed=False)

    participant.refresh_from_db()
    assert participant.state == Participant.State.INSTRUCTIONS


# ---------------------------------------------------------------------------------------------------
# Ends set from outside the journey: timed out, returned; a coordinator's retry of a failed generation

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def last_active(participant: Participant, minutes_ago: float) -> Participant:
    """Set when the participant last did something, `minutes_ago` before NOW (update() leaves auto_now
    alone, so the time is exactly this)."""
    Participant.objects.filter(pk=participant.pk).update(updated_at=NOW - timedelta(minutes=minutes_ago))
    participant.refresh_from_db()
    return participant


@pytest.mark.django_db
def test_it_times_out_exactly_the_unfinished_participants_inactive_past_their_studys_limit() -> None:
    study = make_study(time_limit_minutes=30)
    stale_at_consent = last_active(make_participant(study), 31)
    stale_picking = last_active(participant_at_elicitation(study), 30.01)
    stale_waiting = last_active(participant_waiting(study), 600)
    active_picking = last_active(participant_at_elicitation(study), 29.9)
    finished = participant_rating(study)
    survey_record(participant=rate_all(finished), answers={})
    finished = last_active(finished, 600)
    withdrawn = last_active(participant_withdraw(participant=participant_at_elicitation(study)), 600)
    patient_study = make_study(time_limit_minutes=120)
    within_longer_limit = last_active(participant_at_elicitation(patient_study), 90)

    expired = participants_expire(now=NOW)

    states = {
        name: Participant.objects.get(pk=p.pk).state
        for name, p in {
            "stale_at_consent": stale_at_consent,
            "stale_picking": stale_picking,
            "stale_waiting": stale_waiting,
            "active_picking": active_picking,
            "finished": finished,
            "withdrawn": withdrawn,
            "within_longer_limit": within_longer_limit,
        }.items()
    }
    assert expired == 3
    assert states == {
        "stale_at_consent": State.TIMED_OUT,
        "stale_picking": State.TIMED_OUT,
        "stale_waiting": State.TIMED_OUT,
        "active_picking": State.ELICITATION,
        "finished": State.COMPLETED,
        "withdrawn": State.WITHDRAWN,
        "within_longer_limit": State.ELICITATION,
    }
    assert Participant.objects.get(pk=stale_picking.pk).finished_at == NOW
    assert participants_expire(now=NOW) == 0  # run again: nothing more to do


@pytest.mark.django_db
def test_it_times_out_only_the_given_studys_participants() -> None:
    study, other = make_study(time_limit_minutes=10), make_study(time_limit_minutes=10)
    mine = last_active(make_participant(study), 60)
    theirs = last_active(make_participant(other), 60)

    assert participants_expire(now=NOW, study=study) == 1

    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert (mine.state, theirs.state) == (State.TIMED_OUT, State.CONSENT)


@pytest.mark.django_db
def test_it_keeps_a_timed_out_participants_judgments() -> None:
    participant = participant_rating(make_study(time_limit_minutes=5))
    rate(participant, 0)
    last_active(participant, 6)

    participants_expire(now=NOW)

    participant.refresh_from_db()
    assert participant.state == State.TIMED_OUT
    assert ElicitationPick.objects.filter(item__participant=participant).count() == participant.n_picks
    assert GeneratedResponse.objects.filter(participant=participant).count() == 4
    assert Rating.objects.filter(item__participant=participant).count() == 1
    assert participant.ratings_done == 1


@pytest.mark.django_db
def test_it_ignores_a_replayed_judgment_of_a_timed_out_participant() -> None:
    participant = participant_at_elicitation(make_study(time_limit_minutes=5))
    pick(participant, 0)
    last_active(participant, 6)
    participants_expire(now=NOW)
    item = participant.elicitation_items.get(position=1)

    with pytest.raises(ValidationError):
        elicitation_pick_record(participant=participant, item_id=item.pk, choice="left")
    # Already answered before the time-out: a replay records nothing.
    assert pick(participant, 0) is False

    participant.refresh_from_db()
    assert (participant.state, participant.picks_done) == (State.TIMED_OUT, 1)
    assert ElicitationPick.objects.filter(item__participant=participant).count() == 1


@pytest.mark.django_db
def test_a_timed_out_participant_cannot_withdraw_from_their_pages() -> None:
    participant = participant_at_elicitation(make_study(time_limit_minutes=5))
    pick(participant, 0)
    last_active(participant, 6)
    participants_expire(now=NOW)

    participant_withdraw(participant=participant)

    participant.refresh_from_db()
    assert participant.state == State.TIMED_OUT
    assert ElicitationPick.objects.filter(item__participant=participant).count() == 1


@pytest.mark.django_db
def test_it_frees_the_place_of_a_timed_out_or_returned_participant() -> None:
    study = make_study(quota=2, time_limit_minutes=5)
    timed_out, returned = consented(make_participant(study)), consented(make_participant(study))
    last_active(timed_out, 6)
    participants_expire(now=NOW)
    participant_mark_returned(participant=returned)

    newcomers = [consented(make_participant(study)) for _ in range(3)]

    assert [p.state for p in newcomers] == [State.INSTRUCTIONS, State.INSTRUCTIONS, State.SCREENED_OUT]
    assert sorted(p.place for p in newcomers[:2]) == [1, 2]
    assert Participant.objects.filter(pk__in=[timed_out.pk, returned.pk], place__isnull=False).count() == 0


def consented(participant: Participant) -> Participant:
    return participant_consent(participant=participant, agreed=True)


@pytest.mark.django_db(transaction=True)
def test_it_never_gives_more_places_than_the_quota_to_arrivals_at_once() -> None:
    """Places are claimed without a lock on the study: arrivals that pick the same number meet on its
    unique constraint and pick again (here every arrival is a thread of its own, on PostgreSQL)."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    study = make_study(quota=5)
    arrivals = [make_participant(study) for _ in range(12)]

    def consent(participant: Participant) -> str:
        try:
            return consented(participant).state
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=6) as pool:
        states = list(pool.map(consent, arrivals))

    assert states.count(State.INSTRUCTIONS) == 5
    assert states.count(State.SCREENED_OUT) == 7
    places = Participant.objects.filter(study=study, place__isnull=False).values_list("place", flat=True)
    assert sorted(places) == [1, 2, 3, 4, 5]


@pytest.mark.django_db
def test_lowering_the_quota_keeps_the_places_held_within_it() -> None:
    study = make_study(quota=6)
    holders = sorted((consented(make_participant(study)) for _ in range(6)), key=lambda p: p.place)
    for participant in holders[:4]:  # places 1-4 given back: 5 and 6 are held, above the new quota
        participant_mark_returned(participant=participant)

    arms = [ArmSpec(a.name, a.method, a.checkpoint) for a in study.arms.all()]
    pairs = [(c.arm.name, c.baseline.name) for c in study.comparisons.all()]
    study_update(study=study, fields={"quota": 3}, arms=arms, comparisons=pairs)

    places = set(Participant.objects.filter(study=study, place__isnull=False).values_list("place", flat=True))
    assert len(places) == 2 and places <= {1, 2, 3}
    assert consented(make_participant(study)).place == ({1, 2, 3} - places).pop()
    assert consented(make_participant(study)).state == State.SCREENED_OUT


@pytest.mark.django_db
@pytest.mark.parametrize("make", [make_participant, participant_rating, participant_waiting])
def test_it_marks_a_participant_returned_and_keeps_their_judgments(make) -> None:
    participant = make(make_study())
    picks = ElicitationPick.objects.filter(item__participant=participant).count()

    participant_mark_returned(participant=participant)

    participant.refresh_from_db()
    assert participant.state == State.RETURNED
    assert participant.finished_at is not None
    assert ElicitationPick.objects.filter(item__participant=participant).count() == picks


@pytest.mark.django_db
def test_it_marks_a_completed_participant_returned_when_the_platform_says_so() -> None:
    participant = rate_all(participant_rating(make_study()))
    survey_record(participant=participant, answers={})

    participant_mark_returned(participant=participant)

    participant.refresh_from_db()
    assert participant.state == State.RETURNED
    assert SurveyResponse.objects.filter(participant=participant).exists()


@pytest.mark.django_db
def test_marking_a_returned_participant_again_changes_nothing() -> None:
    participant = participant_mark_returned(participant=make_participant(make_study()))
    finished_at = participant.finished_at

    again = participant_mark_returned(participant=participant)

    assert (again.state, again.finished_at) == (State.RETURNED, finished_at)


@pytest.mark.django_db
def test_it_refuses_to_mark_returned_a_participant_who_withdrew() -> None:
    participant = participant_withdraw(participant=participant_at_elicitation(make_study()))

    with pytest.raises(ValidationError, match="withdrawn cannot be marked returned"):
        participant_mark_returned(participant=participant)

    participant.refresh_from_db()
    assert participant.state == State.WITHDRAWN


def failed_generation(study=None) -> Participant:
    participant = participant_waiting(study or make_study())
    participant_generation_fail(participant_id=participant.pk, error="OSError: /models/fspo: no such folder")
    participant.refresh_from_db()
    return participant


def enqueued(callbacks) -> list[tuple]:
    return [c.args for c in callbacks if getattr(c, "func", None) is personalize_enqueue]


@pytest.mark.django_db
def test_it_retries_a_failed_generation_once_however_often_it_is_asked(
    django_capture_on_commit_callbacks,
) -> None:
    participant = failed_generation()

    with django_capture_on_commit_callbacks() as first:
        participant_generation_retry(participant=participant)
    with django_capture_on_commit_callbacks() as second, pytest.raises(ValidationError):
        participant_generation_retry(participant=participant)

    participant.refresh_from_db()
    assert (participant.state, participant.generation, participant.generation_error) == (
        State.WAITING,
        Generation.QUEUED,
        "",
    )
    assert enqueued(first) == [(participant.pk,)]
    assert enqueued(second) == []


@pytest.mark.django_db
def test_it_retries_nothing_but_a_failed_generation(django_capture_on_commit_callbacks) -> None:
    queued = participant_waiting(make_study())
    timed_out = failed_generation(make_study(time_limit_minutes=5))
    last_active(timed_out, 6)
    participants_expire(now=NOW)

    for participant in (queued, timed_out):
        with django_capture_on_commit_callbacks() as callbacks, pytest.raises(ValidationError):
            participant_generation_retry(participant=participant)
        assert enqueued(callbacks) == []

    timed_out.refresh_from_db()
    assert (timed_out.state, timed_out.generation) == (State.TIMED_OUT, Generation.FAILED)


# ---------------------------------------------------------------------------------------------------
# The stale-work sweeper: generations and jobs whose worker was lost are queued again, once


def running_generation(beat_seconds_ago: float) -> Participant:
    """A participant whose generation a worker started, its last heartbeat `beat_seconds_ago`."""
    participant = participant_waiting(make_study())
    assert participant_generation_start(participant_id=participant.pk)
    beat = timezone.now() - timedelta(seconds=beat_seconds_ago)
    Participant.objects.filter(pk=participant.pk).update(generation_heartbeat_at=beat)
    participant.refresh_from_db()
    return participant


@pytest.mark.django_db
def test_the_sweeper_queues_again_a_generation_whose_worker_went_silent_and_no_other(
    settings, django_capture_on_commit_callbacks
) -> None:
    settings.STALE_WORK_AFTER_S = 30
    lost, alive = running_generation(beat_seconds_ago=31), running_generation(beat_seconds_ago=2)

    with django_capture_on_commit_callbacks() as first:
        assert generations_recover() == {"requeued": 1, "sent": 0}
    with django_capture_on_commit_callbacks() as second:
        assert generations_recover() == {"requeued": 0, "sent": 0}

    lost.refresh_from_db(), alive.refresh_from_db()
    assert (lost.generation, lost.generation_error) == (
        Generation.QUEUED,
        "queued again: its worker was lost",
    )
    assert alive.generation == Generation.RUNNING
    assert enqueued(first) == [(lost.pk,)]
    assert enqueued(second) == []
    assert participant_generation_start(participant_id=lost.pk)  # the next worker takes it
    assert not participant_generation_start(participant_id=lost.pk)  # and only that one


@pytest.mark.django_db
def test_a_coordinator_can_retry_a_stuck_generation_but_not_a_live_one(
    settings, django_capture_on_commit_callbacks
) -> None:
    settings.STALE_WORK_AFTER_S = 30
    stuck, alive = running_generation(beat_seconds_ago=45), running_generation(beat_seconds_ago=2)

    with django_capture_on_commit_callbacks() as callbacks:
        participant_generation_retry(participant=stuck)
    with pytest.raises(ValidationError, match="failed or is stuck"):
        participant_generation_retry(participant=alive)

    stuck.refresh_from_db()
    assert stuck.generation == Generation.QUEUED
    assert enqueued(callbacks) == [(stuck.pk,)]


@pytest.mark.django_db
def test_a_heartbeat_keeps_a_running_generation_from_the_sweeper(settings) -> None:
    settings.STALE_WORK_AFTER_S = 30
    participant = running_generation(beat_seconds_ago=31)

    participant_generations_heartbeat(participant_ids=[participant.pk])

    assert generations_recover() == {"requeued": 0, "sent": 0}
    participant.refresh_from_db()
    assert participant.generation == Generation.RUNNING


# ---------------------------------------------------------------------------------------------------
# Batches: a worker that starts one participant's generation takes the study's others who wait with it


def started(participant: Participant) -> Participant:
    assert participant_generation_start(participant_id=participant.pk)
    participant.refresh_from_db()
    return participant


@pytest.mark.django_db
def test_a_started_generation_claims_the_studys_first_attempts_waiting_oldest_first_up_to_the_limit() -> None:
    study = make_study()
    lead, first, second, third = (participant_waiting(study) for _ in range(4))
    failed_before = participant_waiting(study)
    Participant.objects.filter(pk=failed_before.pk).update(generation_error="retrying after: OSError")
    elsewhere = participant_waiting(make_study())
    # The broker has not taken the second one's task yet: still a first attempt.
    Participant.objects.filter(pk=second.pk).update(generation_error=f"{Participant.NOT_SENT}refused")
    started(lead)

    assert participant_generations_claim(participant_id=lead.pk, limit=2) == [first.pk, second.pk]
    assert participant_generations_claim(participant_id=lead.pk, limit=5) == [third.pk]
    assert participant_generations_claim(participant_id=lead.pk, limit=5) == []

    for participant in (first, second, third):
        participant.refresh_from_db()
        assert participant.generation == Generation.RUNNING
        assert participant.generation_heartbeat_at is not None
        assert not participant_generation_start(participant_id=participant.pk)  # their own task skips
    for participant in (failed_before, elsewhere):
        participant.refresh_from_db()
        assert participant.generation == Generation.QUEUED


@pytest.mark.django_db
def test_a_generation_that_failed_before_or_a_limit_of_zero_claims_nobody() -> None:
    study = make_study()
    lead, other = participant_waiting(study), participant_waiting(study)
    started(lead)

    assert participant_generations_claim(participant_id=lead.pk, limit=0) == []
    Participant.objects.filter(pk=lead.pk).update(generation_error="retrying after: OSError")
    assert participant_generations_claim(participant_id=lead.pk, limit=5) == []
    assert participant_generations_claim(participant_id=other.pk, limit=5) == []  # not started

    other.refresh_from_db()
    assert other.generation == Generation.QUEUED


@pytest.mark.django_db
def test_a_failed_batch_queues_each_claimed_participant_again_with_a_task_of_its_own(
    django_capture_on_commit_callbacks,
) -> None:
    study = make_study()
    lead, claimed, stored = (participant_waiting(study) for _ in range(3))
    started(lead)
    assert participant_generations_claim(participant_id=lead.pk, limit=2) == [claimed.pk, stored.pk]
    responses_store(participant_id=stored.pk, responses=fake_responses(stored))

    with django_capture_on_commit_callbacks() as callbacks:
        assert participant_generation_requeue(participant_id=claimed.pk, error="retrying alone after: X")
        assert not participant_generation_requeue(participant_id=stored.pk, error="retrying alone after: X")

    claimed.refresh_from_db(), stored.refresh_from_db()
    assert (claimed.generation, claimed.generation_error) == (Generation.QUEUED, "retrying alone after: X")
    assert stored.generation == Generation.READY
    assert enqueued(callbacks) == [(claimed.pk,)]
    # It generates alone from now on: no other batch claims it, and its own start claims nobody.
    other_lead = started(participant_waiting(study))
    assert participant_generations_claim(participant_id=other_lead.pk, limit=5) == []
    started(claimed)
    assert participant_generations_claim(participant_id=claimed.pk, limit=5) == []


@pytest.mark.django_db
def test_the_sweeper_queues_again_every_participant_of_a_batch_whose_worker_died(
    settings, django_capture_on_commit_callbacks
) -> None:
    settings.STALE_WORK_AFTER_S = 30
    study = make_study()
    lead, *others = (participant_waiting(study) for _ in range(3))
    started(lead)
    assert participant_generations_claim(participant_id=lead.pk, limit=2) == [p.pk for p in others]
    batch = [lead.pk, *(p.pk for p in others)]
    participant_generations_heartbeat(participant_ids=batch)
    assert generations_recover() == {"requeued": 0, "sent": 0}  # alive: the batch beats for everyone
    silent = timezone.now() - timedelta(seconds=31)
    Participant.objects.filter(pk__in=batch).update(generation_heartbeat_at=silent)

    with django_capture_on_commit_callbacks() as callbacks:
        assert generations_recover() == {"requeued": 3, "sent": 0}

    assert sorted(enqueued(callbacks)) == sorted((pk,) for pk in batch)
    assert set(Participant.objects.filter(pk__in=batch).values_list("generation", flat=True)) == {
        Generation.QUEUED
    }


@pytest.mark.django_db
def test_the_sweeper_queues_again_a_job_whose_worker_went_silent_and_it_starts_once(
    settings, django_capture_on_commit_callbacks
) -> None:
    settings.STALE_WORK_AFTER_S = 30
    job = make_job(kind=Job.Kind.TRAIN)
    assert job_start(job_id=str(job.pk)) is not None
    assert job_start(job_id=str(job.pk)) is None  # a duplicate message while it runs on a live worker
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=40))

    with django_capture_on_commit_callbacks() as callbacks:
        assert jobs_recover() == 1
    assert jobs_recover() == 0

    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED
    assert "its worker was lost (no sign of life for 40 s): queued again" in job.log
    assert [c.func for c in callbacks if isinstance(c, partial)] == [job_enqueue]
    again = job_start(job_id=str(job.pk))
    assert again is not None and "started again (its worker was lost)" in again.log
