import asyncio
import os
import uuid

from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings

from studyapp.asgi import application
from studyapp.realtime import notify_job

LOCAL_ORIGIN = (b"origin", b"http://localhost")


def _socket(job_id: str, origin: tuple[bytes, bytes] = LOCAL_ORIGIN) -> WebsocketCommunicator:
    """A client socket on the job's progress URL, through the real ASGI application."""
    return WebsocketCommunicator(application, f"/ws/jobs/{job_id}/", headers=[origin])


# notify_job is sync code (as in a Celery task); the tests run it in a thread, off the event loop.
notify_job_from_sync_code = sync_to_async(notify_job)


def test_it_uses_the_redis_channel_layer_when_redis_url_is_set() -> None:
    expected = (
        "channels_redis.core.RedisChannelLayer"
        if os.environ.get("REDIS_URL")
        else "channels.layers.InMemoryChannelLayer"
    )
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == expected


def test_it_forwards_a_jobs_progress_to_its_socket() -> None:
    job_id = f"job-{uuid.uuid4().hex}"
    payload = {"job_id": job_id, "state": "PROGRESS", "done": 3, "total": 10, "stage": "pairs"}

    async def scenario() -> dict:
        socket = _socket(job_id)
        connected, _ = await socket.connect()
        assert connected
        await notify_job_from_sync_code(job_id, payload)
        received = await socket.receive_json_from(timeout=5)
        await socket.disconnect()
        return received

    assert asyncio.run(scenario()) == payload


def test_it_does_not_forward_another_jobs_progress() -> None:
    job_id, other_job_id = f"job-{uuid.uuid4().hex}", f"job-{uuid.uuid4().hex}"

    async def scenario() -> bool:
        socket = _socket(job_id)
        connected, _ = await socket.connect()
        assert connected
        await notify_job_from_sync_code(other_job_id, {"done": 1})
        silent = await socket.receive_nothing(timeout=1)
        await socket.disconnect()
        return silent

    assert asyncio.run(scenario())


def test_it_refuses_a_socket_from_a_foreign_origin() -> None:
    async def scenario() -> bool:
        connected, _ = await _socket("job-1", origin=(b"origin", b"http://evil.example")).connect()
        return connected

    assert not asyncio.run(scenario())
