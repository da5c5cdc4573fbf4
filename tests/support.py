"""Helpers for driving the site as a participant would: a browser that is a given participant, and a
way to run async socket code against the test database."""

import asyncio
from collections.abc import Coroutine
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connections
from django.test import Client

from studyapp.models import Participant
from studyapp.sessions import session_bind


def browser_of(participant: Participant) -> Client:
    """A test client whose session is this participant (as after following their entry link)."""
    client = Client()
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
