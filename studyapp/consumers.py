from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from studyapp.realtime import job_group


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
