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
from tests.factories import make_study, participant_at_elicitation
from tests.support import run_async

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

    assert run_async(scenario()) == {"state": "elicitation", "generation": "not_started"}


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


def test_it_refuses_a_socket_for_another_participant() -> None:
    study = make_study()
    participant, other = participant_at_elicitation(study), participant_at_elicitation(study)
    key = session_of(participant)

    async def scenario() -> tuple[bool, int | None]:
        connected, code = await socket(other.token, key).connect()
        return connected, code

    assert run_async(scenario()) == (False, FORBIDDEN)


def test_it_refuses_a_socket_without_a_session() -> None:
    participant = participant_at_elicitation(make_study())

    async def scenario() -> bool:
        connected, _ = await socket(participant.token, None).connect()
        return connected

    assert not run_async(scenario())
