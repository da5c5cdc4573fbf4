"""Live updates: the one place that names channel-layer groups and sends to them from sync code.

Services notify on commit, robustly: a channel layer that is down is logged, and never turns a change
already stored into an error (every live page also polls)."""

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction

IN_MEMORY_LAYER = "channels.layers.InMemoryChannelLayer"


def live_socket_path(path: str) -> str:
    """The socket a live page should open, or "" when the page should poll instead: the in-memory
    channel layer (the embedded default) lives inside one process, so what a worker process sends never
    reaches a socket the web server holds, and a page listening there would wait forever."""
    return "" if settings.CHANNEL_LAYERS["default"]["BACKEND"] == IN_MEMORY_LAYER else path


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
    """`notify_participant` once the current transaction commits (never for a change rolled back).
    Robust: a page that cannot be told must never fail the change already stored (the waiting page's
    polling catches up)."""
    transaction.on_commit(lambda: notify_participant(token, payload), robust=True)


def notify_participant_changed_on_commit(participant: Any) -> None:
    """A participant's state or generation changed: once the transaction commits, their open pages get
    their new status and the study's open dashboards recompute."""
    from studyapp.selectors import participant_status  # at call time: this module loads before the models

    notify_participant_on_commit(participant.token, participant_status(participant=participant))
    notify_study_on_commit(participant.study_id)


def notify_job_on_commit(job_id: str, payload: dict[str, Any]) -> None:
    """`notify_job` once the current transaction commits. Robust: a job page that cannot be told must
    never fail the job's worker or its launch (the job's page polls too)."""
    transaction.on_commit(lambda: notify_job(job_id, payload), robust=True)


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
