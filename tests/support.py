"""Helpers for driving the site as a participant or a coordinator would: a browser that is a given
participant or a signed-in coordinator, socket headers carrying a session, and a way to run async socket
code against the test database."""

import asyncio
import os
from collections.abc import Coroutine
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connections
from django.test import Client

from studyapp.models import Participant
from studyapp.sessions import session_bind


def browser_of(participant: Participant, *, enforce_csrf_checks: bool = False) -> Client:
    """A test client whose session is this participant (as after following their entry link); with
    `enforce_csrf_checks`, its posts are checked for a CSRF token and origin as a browser's are."""
    client = Client(enforce_csrf_checks=enforce_csrf_checks)
    session = client.session
    session_bind(session, study_slug=participant.study.slug, token=participant.token)
    session.save()
    return client


def run_async(scenario: Coroutine[Any, Any, Any]) -> Any:
    """Run async test code, then close the database connection that sync code called from it opened in
    asgiref's worker thread (left open, it would keep the test database from being dropped)."""

    async def run_and_close() -> Any:
        try:
            return await scenario
        finally:
            await sync_to_async(connections.close_all)()

    return asyncio.run(run_and_close())


def coordinator_browser(user: User) -> Client:
    """A test client signed in as this user."""
    client = Client()
    client.force_login(user)
    return client


def socket_headers(client: Client | None = None) -> list[tuple[bytes, bytes]]:
    """WebSocket request headers from this site's origin, carrying the client's session cookie if any."""
    headers = [(b"origin", b"http://localhost")]
    if client is not None and settings.SESSION_COOKIE_NAME in client.cookies:
        cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
        headers.append((b"cookie", cookie.encode()))
    return headers


def process_alive(pid: int) -> bool:
    """Whether a process with this id still exists (a zombie not yet reaped by its parent counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
