"""Live updates: the one place that names channel-layer groups and sends to them from sync code."""

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction


def job_group(job_id: str) -> str:
    """The channel-layer group that watchers of one job join."""
    return f"job-{job_id}"


def notify_job(job_id: str, payload: dict[str, Any]) -> None:
    """Send `payload` (JSON-serializable) to every socket watching the job."""
    channel_layer = get_channel_layer()
    async_to_sync(channel_layer.group_send)(job_group(job_id), {"type": "job.progress", "payload": payload})


def participant_group(token: str) -> str:
    """The channel-layer group of one participant's sockets (their waiting page)."""
    return f"participant-{token}"


def notify_participant(token: str, payload: dict[str, Any]) -> None:
    """Send `payload` (JSON-serializable) to the participant's open pages."""
    channel_layer = get_channel_layer()
    async_to_sync(channel_layer.group_send)(
        participant_group(token), {"type": "participant.update", "payload": payload}
    )


def notify_participant_on_commit(token: str, payload: dict[str, Any]) -> None:
    """`notify_participant` once the current transaction commits (never for a change rolled back)."""
    transaction.on_commit(lambda: notify_participant(token, payload))


def notify_job_on_commit(job_id: str, payload: dict[str, Any]) -> None:
    """`notify_job` once the current transaction commits."""
    transaction.on_commit(lambda: notify_job(job_id, payload))


def study_group(study_id: int) -> str:
    """The channel-layer group of a study's live dashboards."""
    return f"study-{study_id}"


def notify_study(study_id: int) -> None:
    """Tell the study's open dashboards that its participants or ratings changed (they recompute)."""
    channel_layer = get_channel_layer()
    async_to_sync(channel_layer.group_send)(study_group(study_id), {"type": "study.changed"})


def notify_study_on_commit(study_id: int) -> None:
    """`notify_study` once the current transaction commits. Called by every service that moves a
    participant to another state or records a rating. Robust: a dashboard that cannot be told must never
    fail the participant's request (the dashboard's polling catches up)."""
    transaction.on_commit(lambda: notify_study(study_id), robust=True)
