"""WebSocket consumers. Each one authenticates, joins a group named by studyapp.realtime, and forwards.

- JobProgressConsumer (/ws/jobs/<id>/) and StudyDashboardConsumer (/ws/studies/<slug>/dashboard/):
  coordinators and analysts only (studyapp.coordinators.can_view_studio), checked on connect.
- ParticipantConsumer (/ws/participants/<token>/): only the participant's own browser session.
"""

import uuid
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from studyapp.coordinators import can_view_studio
from studyapp.models import Study
from studyapp.realtime import job_group, participant_group, study_group
from studyapp.selectors import job_status_by_id, participant_status_by_token, study_dashboard_by_id
from studyapp.sessions import session_tokens

# Close codes (4000-4999: application): a socket this session may not open; one for nothing that exists.
FORBIDDEN = 4403
NOT_FOUND = 4404


@database_sync_to_async
def _can_view_studio(scope: dict[str, Any]) -> bool:
    return can_view_studio(scope.get("user"))


@database_sync_to_async
def _job_status(job_id: str) -> dict[str, Any] | None:
    try:
        uuid.UUID(job_id)
    except ValueError:
        return None
    return job_status_by_id(job_id=job_id)


class GroupConsumer(AsyncJsonWebsocketConsumer):
    """The shape every live page shares: after its own access check a consumer joins one group, accepts
    and sends the current state; it leaves the group when the socket closes."""

    group: str | None = None

    async def join(self, group: str, current: dict[str, Any] | None) -> None:
        self.group = group
        await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        if current is not None:
            await self.send_json(current)

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def forward(self, event: dict[str, Any]) -> None:
        await self.send_json(event["payload"])


class JobProgressConsumer(GroupConsumer):
    """A job page's socket (coordinators and analysts): the job's status at once, then every event sent
    with realtime.notify_job."""

    async def connect(self) -> None:
        if not await _can_view_studio(self.scope):
            await self.close(code=FORBIDDEN)
            return
        job_id = self.scope["url_route"]["kwargs"]["job_id"]
        status = await _job_status(job_id)
        if status is None:
            await self.close(code=NOT_FOUND)
            return
        await self.join(job_group(job_id), status)

    async def job_progress(self, event: dict[str, Any]) -> None:
        await self.forward(event)


@database_sync_to_async
def _study_id(slug: str) -> int | None:
    return Study.objects.filter(slug=slug).values_list("pk", flat=True).first()


class StudyDashboardConsumer(GroupConsumer):
    """A study dashboard's socket (coordinators and analysts): the dashboard's numbers at once, and again
    each time a service tells the study's group that participants or ratings changed
    (realtime.notify_study)."""

    study_id: int | None = None

    async def connect(self) -> None:
        if not await _can_view_studio(self.scope):
            await self.close(code=FORBIDDEN)
            return
        self.study_id = await _study_id(self.scope["url_route"]["kwargs"]["slug"])
        if self.study_id is None:
            await self.close(code=NOT_FOUND)
            return
        await self.join(study_group(self.study_id), None)
        await self.send_dashboard()

    async def study_changed(self, event: dict[str, Any]) -> None:
        await self.send_dashboard()

    async def send_dashboard(self) -> None:
        assert self.study_id is not None
        dashboard = await database_sync_to_async(study_dashboard_by_id)(study_id=self.study_id)
        if dashboard is not None:
            await self.send_json(dashboard)


@database_sync_to_async
def _owned_status(session: Any, token: str) -> dict[str, Any] | None:
    """The participant's status if this session is that participant, else None (sessions load from the
    database, hence sync)."""
    if session is None or token not in session_tokens(session):
        return None
    return participant_status_by_token(token=token)


class ParticipantConsumer(GroupConsumer):
    """The waiting page's socket: only the participant's own session may join. It sends the current
    status at once (so an update made before the socket opened is not missed), then every update sent
    with realtime.notify_participant."""

    async def connect(self) -> None:
        token = self.scope["url_route"]["kwargs"]["token"]
        status = await _owned_status(self.scope.get("session"), token)
        if status is None:
            await self.close(code=FORBIDDEN)
            return
        await self.join(participant_group(token), status)

    async def participant_update(self, event: dict[str, Any]) -> None:
        await self.forward(event)
