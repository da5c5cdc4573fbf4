from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from studyapp.realtime import job_group, participant_group
from studyapp.selectors import participant_status_by_token
from studyapp.sessions import session_tokens

# Close code for a socket refused because it is not this session's participant (4000-4999: application).
FORBIDDEN = 4403


class JobProgressConsumer(AsyncJsonWebsocketConsumer):
    """Forwards a job's progress events (sent with realtime.notify_job) to the socket as JSON."""

    async def connect(self) -> None:
        self.group = job_group(self.scope["url_route"]["kwargs"]["job_id"])
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.group, self.channel_name)

    async def job_progress(self, event: dict[str, Any]) -> None:
        await self.send_json(event["payload"])


@database_sync_to_async
def _owned_status(session: Any, token: str) -> dict[str, Any] | None:
    """The participant's status if this session is that participant, else None (sessions load from the
    database, hence sync)."""
    if session is None or token not in session_tokens(session):
        return None
    return participant_status_by_token(token=token)


class ParticipantConsumer(AsyncJsonWebsocketConsumer):
    """The waiting page's socket: only the participant's own session may join. It sends the current
    status at once (so an update made before the socket opened is not missed), then every update sent
    with realtime.notify_participant."""

    group: str | None = None

    async def connect(self) -> None:
        token = self.scope["url_route"]["kwargs"]["token"]
        status = await _owned_status(self.scope.get("session"), token)
        if status is None:
            await self.close(code=FORBIDDEN)
            return
        self.group = participant_group(token)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json(status)

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def participant_update(self, event: dict[str, Any]) -> None:
        await self.send_json(event["payload"])
