"""Live updates: the one place that names channel-layer groups and sends to them from sync code."""

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer


def job_group(job_id: str) -> str:
    """The channel-layer group that watchers of one job join."""
    return f"job-{job_id}"


def notify_job(job_id: str, payload: dict[str, Any]) -> None:
    """Send `payload` (JSON-serializable) to every socket watching the job."""
    channel_layer = get_channel_layer()
    async_to_sync(channel_layer.group_send)(job_group(job_id), {"type": "job.progress", "payload": payload})
