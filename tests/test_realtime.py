import os
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from studyapp.asgi import application
from studyapp.realtime import notify_job
from tests.factories import make_coordinator, make_job
from tests.support import coordinator_browser, run_async, socket_headers


def _socket(job_id: str, browser: Client | None = None) -> WebsocketCommunicator:
    """A client socket on the job's progress URL, through the real ASGI application."""
    return WebsocketCommunicator(application, f"/ws/jobs/{job_id}/", headers=socket_headers(browser))


# notify_job is sync code (as in a Celery task); the tests run it in a thread, off the event loop.
notify_job_from_sync_code = sync_to_async(notify_job)


def test_it_uses_the_redis_channel_layer_when_redis_url_is_set() -> None:
    expected = (
        "channels_redis.core.RedisChannelLayer"
        if os.environ.get("REDIS_URL")
        else "channels.layers.InMemoryChannelLayer"
    )
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == expected


# The consumer reads the session, the user and the job from another thread: the rows must be committed.
@pytest.mark.django_db(transaction=True)
def test_it_forwards_a_jobs_progress_to_its_socket() -> None:
    job_id = str(make_job().pk)
    browser = coordinator_browser(make_coordinator())
    payload = {"job_id": job_id, "status": "running", "done": 3, "total": 10, "stage": "pairs"}

    async def scenario() -> dict:
        socket = _socket(job_id, browser)
        connected, _ = await socket.connect()
        assert connected
        await socket.receive_json_from(timeout=5)  # the job's status, sent on connect
        await notify_job_from_sync_code(job_id, payload)
        received = await socket.receive_json_from(timeout=5)
        await socket.disconnect()
        return received

    assert run_async(scenario()) == payload


@pytest.mark.django_db(transaction=True)
def test_it_does_not_forward_another_jobs_progress() -> None:
    job_id, other_job_id = str(make_job().pk), str(uuid.uuid4())
    browser = coordinator_browser(make_coordinator())

    async def scenario() -> bool:
        socket = _socket(job_id, browser)
        connected, _ = await socket.connect()
        assert connected
        await socket.receive_json_from(timeout=5)
        await notify_job_from_sync_code(other_job_id, {"done": 1})
        silent = await socket.receive_nothing(timeout=1)
        await socket.disconnect()
        return silent

    assert run_async(scenario())


def test_it_refuses_a_socket_from_a_foreign_origin() -> None:
    async def scenario() -> bool:
        socket = WebsocketCommunicator(
            application, "/ws/jobs/job-1/", headers=[(b"origin", b"http://evil.example")]
        )
        connected, _ = await socket.connect()
        # End the application instance (the denier is a consumer with a channel-layer read too).
        await socket.disconnect()
        return connected

    assert not run_async(scenario())
