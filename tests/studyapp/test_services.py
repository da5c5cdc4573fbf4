import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError

from annotation.models import ElicitationPick, GeneratedResponse, Rating, SurveyResponse
from studyapp.models import Participant
from studyapp.services import (
    elicitation_pick_record,
    participant_consent,
    participant_generation_fail,
    participant_generation_retry,
    participant_mark_returned,
    participant_withdraw,
    participants_expire,
    personalize_enqueue,
    recruitment_id_hash,
    survey_record,
)
from tests.factories import (
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
    last_active(make_participant(study), 6)
    returned = make_participant(study)
    participants_expire(now=NOW)
    participant_mark_returned(participant=returned)

    newcomers = [make_participant(study), make_participant(study), make_participant(study)]

    assert [p.state for p in newcomers] == [State.CONSENT, State.CONSENT, State.SCREENED_OUT]


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
