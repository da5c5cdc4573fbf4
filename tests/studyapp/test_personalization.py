import logging
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from django.http import HttpResponse
from django.test import Client, override_settings
from django.utils import timezone

from annotation.models import ElicitationPick, GeneratedResponse, RatingItem
from studyapp.models import Participant
from studyapp.services import (
    generations_recover,
    participant_generation_retry,
    participant_withdraw,
    responses_store,
)
from tests.conftest import closed_port, tasks_sent_through, unreachable_broker_app
from tests.factories import (
    fake_responses,
    make_coordinator,
    make_study,
    participant_at_elicitation,
    participant_rating,
    participant_waiting,
    pick,
)
from tests.support import browser_of, coordinator_browser

State, Generation = Participant.State, Participant.Generation


def channel_layer_down():
    """The channel layer on a Redis that refuses every connection: every send to a socket raises."""
    layer = {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [f"redis://127.0.0.1:{closed_port()}/0"]},
    }
    return override_settings(CHANNEL_LAYERS={"default": layer})


def url(participant: Participant, path: str) -> str:
    return f"/s/{participant.study.slug}/{path}"


def post_only_pick(client: Client, participant: Participant, **options: Any) -> HttpResponse:
    """The participant's browser posts its one pick (a study of one pair): the last pick."""
    item = participant.elicitation_items.get(position=0)
    return client.post(url(participant, "pick/1/"), {"item": item.pk, "choice": "left"}, **options)


def last_pick(participant: Participant) -> None:
    for position in range(participant.picks_done, participant.n_picks):
        pick(participant, position)
    participant.refresh_from_db()


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
def test_it_refuses_responses_missing_an_arm_and_stores_none_of_them() -> None:
    participant = participant_waiting(make_study())
    responses = fake_responses(participant)[1:]

    with pytest.raises(ValueError, match="no response of arm"):
        responses_store(participant_id=participant.pk, responses=responses)

    participant.refresh_from_db()
    assert (participant.state, participant.generation) == (State.WAITING, Generation.QUEUED)
    assert not GeneratedResponse.objects.filter(participant=participant).exists()


@pytest.mark.django_db(transaction=True)
def test_a_last_pick_the_broker_cannot_take_stays_queued_unsent_with_the_brokers_error(
    broker_unreachable: Celery,
) -> None:
    participant = participant_at_elicitation(make_study())

    last_pick(participant)

    assert (participant.state, participant.generation) == (State.WAITING, Generation.QUEUED)
    assert participant.generation_sent_at is None
    assert participant.generation_error.startswith(Participant.NOT_SENT)
    assert "Connection refused" in participant.generation_error
    assert participant.generation_is_delayed
    assert participant.may_retry_generation


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_sends_an_unsent_generation_once_the_broker_is_back() -> None:
    participant = participant_at_elicitation(make_study())
    with tasks_sent_through(unreachable_broker_app()):
        last_pick(participant)
        assert generations_recover(now=timezone.now() + timedelta(seconds=10)) == {"requeued": 0, "sent": 1}
    participant.refresh_from_db()
    assert participant.generation_sent_at is None  # still down: still unsent, still delayed
    assert participant.generation_is_delayed

    swept = generations_recover(now=timezone.now() + timedelta(seconds=10))  # the broker is back

    participant.refresh_from_db()
    assert swept == {"requeued": 0, "sent": 1}
    assert (participant.generation, participant.generation_error) == (Generation.QUEUED, "")
    assert participant.generation_sent_at is not None
    assert not participant.generation_is_delayed
    assert not participant.may_retry_generation  # sent a moment ago: a worker will take it
    assert generations_recover(now=timezone.now() + timedelta(seconds=10)) == {"requeued": 0, "sent": 0}


@pytest.mark.django_db(transaction=True)
def test_the_waiting_page_of_a_pick_the_broker_could_not_take_says_it_is_delayed(
    broker_unreachable: Celery,
) -> None:
    participant = participant_at_elicitation(make_study(n_pairs=1))
    client = browser_of(participant)

    page = post_only_pick(client, participant, follow=True)

    assert page.redirect_chain == [(url(participant, "waiting/"), 302)]
    assert "Our servers are catching up" in page.content.decode()
    assert client.get(url(participant, "status/")).json() == {
        "state": State.WAITING,
        "generation": Generation.QUEUED,
        "delayed": True,
    }


@pytest.mark.django_db(transaction=True)
def test_a_retry_while_the_broker_is_still_down_stays_unsent_and_can_be_retried_later(
    broker_unreachable: Celery,
) -> None:
    participant = participant_at_elicitation(make_study())
    last_pick(participant)

    participant_generation_retry(participant=participant)

    participant.refresh_from_db()
    assert (participant.generation, participant.may_retry_generation) == (Generation.QUEUED, True)
    assert participant.generation_sent_at is None
    assert "Connection refused" in participant.generation_error


@pytest.mark.django_db(transaction=True)
def test_a_channel_layer_outage_never_fails_a_change_already_stored(caplog: pytest.LogCaptureFixture) -> None:
    participant = participant_waiting(make_study())
    client = browser_of(participant)

    with channel_layer_down(), caplog.at_level(logging.ERROR):
        stored = responses_store(participant_id=participant.pk, responses=fake_responses(participant))
        withdrawn = client.post(url(participant, "withdraw/"))

    participant.refresh_from_db()
    assert stored
    assert withdrawn.status_code == 302
    assert participant.state == State.WITHDRAWN
    assert not GeneratedResponse.objects.filter(participant=participant).exists()
    assert "Error calling" in caplog.text  # each failed notification is logged


@pytest.mark.django_db(transaction=True)
def test_a_last_pick_in_a_broker_and_channel_layer_outage_is_stored_and_says_it_is_delayed(
    broker_unreachable: Celery,
) -> None:
    participant = participant_at_elicitation(make_study(n_pairs=1))
    client = browser_of(participant)

    with channel_layer_down():
        response = post_only_pick(client, participant)

    participant.refresh_from_db()
    assert response.status_code == 302
    assert ElicitationPick.objects.get(item__participant=participant).choice == "left"
    assert (participant.state, participant.generation) == (State.WAITING, Generation.QUEUED)
    assert participant.generation_is_delayed


@pytest.mark.django_db(transaction=True)
def test_a_coordinators_retry_in_a_channel_layer_outage_is_recorded(broker_unreachable: Celery) -> None:
    participant = participant_at_elicitation(make_study())
    last_pick(participant)
    coordinator = coordinator_browser(make_coordinator())
    retry = f"/studio/studies/{participant.study.slug}/participants/{participant.token}/retry-generation/"

    with channel_layer_down():
        response = coordinator.post(retry)

    participant.refresh_from_db()
    assert response.status_code == 302
    assert participant.generation == Generation.QUEUED  # queued again, and the broker is still down
    assert participant.generation_is_delayed
