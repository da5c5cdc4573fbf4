import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.sessions.backends.db import SessionStore

from studyapp.asgi import application
from studyapp.consumers import FORBIDDEN
from studyapp.models import Participant
from studyapp.realtime import notify_participant
from studyapp.sessions import session_bind
from tests.factories import (
    make_coordinator,
    make_job,
    make_study,
    participant_at_elicitation,
    participant_rating,
    rate,
)
from tests.support import coordinator_browser, run_async, socket_headers

# The consumer reads the session and the participant from another thread: the rows must be committed.
# (Participants stay before their last pick, which would enqueue a personalize task.)
pytestmark = pytest.mark.django_db(transaction=True)


def session_of(*participants: Participant) -> str:
    """A saved browser session that is these participants; returns its cookie value."""
    session = SessionStore()
    for participant in participants:
        session_bind(session, study_slug=participant.study.slug, token=participant.token)
    session.save()
    return session.session_key


def socket(token: str, session_key: str | None) -> WebsocketCommunicator:
    headers = [(b"origin", b"http://localhost")]
    if session_key:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={session_key}".encode()))
    return WebsocketCommunicator(application, f"/ws/participants/{token}/", headers=headers)


def test_it_sends_the_participant_their_status_as_soon_as_they_connect() -> None:
    participant = participant_at_elicitation(make_study())
    key = session_of(participant)

    async def scenario() -> dict:
        communicator = socket(participant.token, key)
        connected, _ = await communicator.connect()
        assert connected
        first = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return first

    assert run_async(scenario()) == {"state": "elicitation", "generation": "not_started", "delayed": False}


def test_it_forwards_updates_to_the_participants_socket() -> None:
    participant = participant_at_elicitation(make_study())
    key = session_of(participant)
    update = {"state": "rating", "generation": "ready"}

    async def scenario() -> dict:
        communicator = socket(participant.token, key)
        await communicator.connect()
        await communicator.receive_json_from(timeout=5)
        await sync_to_async(notify_participant)(participant.token, update)
        received = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return received

    assert run_async(scenario()) == update


def test_it_keeps_a_waiting_socket_open_past_the_channel_layers_blocking_read() -> None:
    # channels-redis blocks 5 s per read of a socket's channel; a client read timeout no longer than that
    # (redis-py 8's default is 5 s) would drop every socket left idle that long.
    participant = participant_at_elicitation(make_study())
    key = session_of(participant)
    update = {"state": "rating", "generation": "ready"}

    async def scenario() -> dict:
        communicator = socket(participant.token, key)
        await communicator.connect()
        await communicator.receive_json_from(timeout=5)
        assert await communicator.receive_nothing(timeout=7, interval=0.5)
        await sync_to_async(notify_participant)(participant.token, update)
        received = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return received

    assert run_async(scenario()) == update


def test_it_refuses_a_socket_for_another_participant() -> None:
    study = make_study()
    participant, other = participant_at_elicitation(study), participant_at_elicitation(study)
    key = session_of(participant)

    async def scenario() -> tuple[bool, int | None]:
        communicator = socket(other.token, key)
        connected, code = await communicator.connect()
        await communicator.disconnect()
        return connected, code

    assert run_async(scenario()) == (False, FORBIDDEN)


def test_it_refuses_a_socket_without_a_session() -> None:
    participant = participant_at_elicitation(make_study())

    async def scenario() -> bool:
        communicator = socket(participant.token, None)
        connected, _ = await communicator.connect()
        await communicator.disconnect()
        return connected

    assert not run_async(scenario())


def connect_refused(path: str, headers: list[tuple[bytes, bytes]]) -> tuple[bool, int | None]:
    async def scenario() -> tuple[bool, int | None]:
        communicator = WebsocketCommunicator(application, path, headers=headers)
        connected, code = await communicator.connect()
        # Always end the application instance: left running, its channel-layer read outlives the loop.
        await communicator.disconnect()
        return connected, code

    return run_async(scenario())


def test_it_refuses_a_job_socket_to_an_anonymous_user() -> None:
    job = make_job()

    assert connect_refused(f"/ws/jobs/{job.pk}/", socket_headers()) == (False, FORBIDDEN)


def test_it_refuses_a_job_socket_to_a_participants_session() -> None:
    job = make_job()
    key = session_of(participant_at_elicitation(make_study()))
    headers = [
        (b"origin", b"http://localhost"),
        (b"cookie", f"{settings.SESSION_COOKIE_NAME}={key}".encode()),
    ]

    assert connect_refused(f"/ws/jobs/{job.pk}/", headers) == (False, FORBIDDEN)


def test_it_sends_a_coordinator_the_jobs_status_as_soon_as_they_connect() -> None:
    job = make_job(progress_done=3, progress_total=10, stage="pairs")
    browser = coordinator_browser(make_coordinator())

    async def scenario() -> dict:
        communicator = WebsocketCommunicator(
            application, f"/ws/jobs/{job.pk}/", headers=socket_headers(browser)
        )
        connected, _ = await communicator.connect()
        assert connected
        first = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return first

    first = run_async(scenario())
    assert (first["status"], first["done"], first["total"], first["stage"]) == ("queued", 3, 10, "pairs")


def test_it_refuses_a_dashboard_socket_to_an_anonymous_user() -> None:
    study = make_study()

    assert connect_refused(f"/ws/studies/{study.slug}/dashboard/", socket_headers()) == (False, FORBIDDEN)


def test_it_sends_the_dashboard_an_update_when_a_rating_is_recorded() -> None:
    study = make_study()
    participant = participant_rating(study)
    browser = coordinator_browser(make_coordinator())
    first_pair = participant.rating_items.filter(is_attention_check=False).order_by("position").first()
    # Rate up to the first pair (an attention check may come before it), then that pair.
    for position in range(first_pair.position):
        rate(participant, position, choice=participant.rating_items.get(position=position).expected_choice)

    async def scenario() -> tuple[dict, dict]:
        communicator = WebsocketCommunicator(
            application, f"/ws/studies/{study.slug}/dashboard/", headers=socket_headers(browser)
        )
        connected, _ = await communicator.connect()
        assert connected
        before = await communicator.receive_json_from(timeout=5)
        await sync_to_async(rate)(participant, first_pair.position)
        after = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return before, after

    before, after = run_async(scenario())
    assert [wr["n"] for wr in before["win_rates"]] == [0]
    assert [wr["n"] for wr in after["win_rates"]] == [1]
    assert after["ratings"] == 1
