"""The site bench's profile of one page: pyinstrument on the site's own view, in the bench's process.

A few participants walk the whole flow as the load did (the same ScriptedParticipant, the same study,
database and workers), their requests answered by the site's WSGI application in the bench's own thread
instead of over HTTP (so the profiler sees the view, which under ASGI runs in a thread of its own); the
profiler runs only during the requests of the page profiled. What it writes: the frames where the time
is spent (self time), the time by area (the database, templates, the rest of Django, the project's
code), and the whole call tree as text.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from site_load import PacedParticipant, RandomChoices, walk_recorded
from site_setup import COMPLETION_CODE

from studyapp.scripted_participant import Walk

KIND_HEADER = "X-Bench-Kind"  # the request's kind ("POST pick", ...), so the transport knows what to profile
TOP_FRAMES = 12
# Where a frame's file lies, the first match naming its area.
AREAS = (
    ("database (Django ORM, psycopg)", ("django/db/", "psycopg")),
    ("templates", ("django/template/", "django/forms/")),
    (
        "sessions, CSRF, auth, messages",
        ("django/contrib/sessions", "django/middleware/csrf", "django/contrib/"),
    ),
    ("the rest of Django", ("django/",)),
    ("the project's code", ("studyapp/", "annotation/", "worker/", "modeling/")),
    ("task queue (Celery, kombu, Redis)", ("celery/", "kombu/", "redis/")),
    ("whitenoise", ("whitenoise/",)),
)


class InProcess(httpx.AsyncBaseTransport):
    """httpx requests answered by the site's WSGI application in this thread; the profiler runs during
    those whose KIND_HEADER is `kind`, and `seconds` gets each one's time."""

    def __init__(self, kind: str, profiler: Any) -> None:
        from django.core.wsgi import get_wsgi_application

        self.wsgi = httpx.WSGITransport(app=get_wsgi_application())
        self.kind, self.profiler = kind, profiler
        self.seconds: list[float] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        profiled = request.headers.get(KIND_HEADER) == self.kind
        start = time.perf_counter()
        if profiled:
            self.profiler.start()
        try:
            response = self.wsgi.handle_request(request)
            content = response.read()
        finally:
            if profiled:
                self.profiler.stop()
                self.seconds.append(time.perf_counter() - start)
        return httpx.Response(response.status_code, headers=response.headers, content=content)


class InProcessParticipant(PacedParticipant):
    """A participant whose requests go to `transport`, each tagged with its kind."""

    def __init__(self, *args: Any, transport: InProcess, **options: Any) -> None:
        super().__init__(*args, **options)
        self.client = httpx.AsyncClient(base_url="http://127.0.0.1", transport=transport, timeout=120)

    async def send(
        self, kind: str, method: str, url: str, data: Any = None, **options: Any
    ) -> httpx.Response:
        return await super().send(kind, method, url, data, headers={KIND_HEADER: kind}, **options)


async def page_profile(
    slug: str, kind: str, *, participants: int, timeout_s: float, tree: Path
) -> tuple[dict[str, Any], list[Walk]]:
    """Profile the page `kind` over `participants` walked one after another through `slug` (after one
    more, unprofiled); the whole call tree is written to `tree`. Returns the requests profiled, their
    times, the top frames by self time and the time by area; and what each participant did (for the
    database's count)."""
    from django.db import connection
    from pyinstrument import Profiler
    from pyinstrument.renderers import ConsoleRenderer

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    transport = InProcess(kind, profiler)
    errors: Counter[str] = Counter()
    # The views run in this thread, which has an event loop: Django's guard against that is for code that
    # would block other requests, and here there are none.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    walked: list[Walk] = []
    try:
        # The first participant warms this process up (its first requests import, compile templates and
        # open connections), unprofiled.
        for i in range(participants + 1):
            transport.kind = kind if i else ""
            participant = InProcessParticipant(
                "http://127.0.0.1",
                slug,
                f"bench-profile-{os.getpid()}-{i:03d}",
                transport=transport,
                pacing=None,
                seed=f"profile:{i}",
                chooser=RandomChoices(f"profile:{i}"),
                study_id="bench",
                session_id=f"s-profile-{i}",
                replays=True,
                poll_s=0.05,
                wait_timeout_s=timeout_s,
                completion_code=COMPLETION_CODE,
            )
            walked.append(await walk_recorded(participant))
            errors.update(participant.rec.errors)
    finally:
        connection.close()  # the next of the bench's queries opens its own
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    session = profiler.last_session
    if session is None:
        return {"page": kind, "requests": 0, "errors": dict(errors)}, walked
    tree.write_text(ConsoleRenderer(unicode=False, color=False, short_mode=True).render(session))
    frames, areas = _self_times(session.root_frame())
    total = sum(areas.values()) or 1.0
    return {
        "page": kind,
        "how": "in-process: the site's WSGI application in the bench's thread, pyinstrument (0.5 ms samples)",
        "requests": len(transport.seconds),
        "ms_per_request": 1000 * sum(transport.seconds) / max(1, len(transport.seconds)),
        "errors": dict(errors),
        "top_frames": [
            {"frame": name, "self_ms": 1000 * s, "share": s / total}
            for name, s in frames.most_common(TOP_FRAMES)
        ],
        "by_area": {area: s / total for area, s in areas.most_common()},
        "tree": str(tree),
    }, walked


def _self_times(root: Any) -> tuple[Counter[str], Counter[str]]:
    """Self time (a frame's own, not its callees') by frame and by area, over the tree under `root`."""
    frames: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    stack = [(root, "")]
    while stack:
        frame, parent_path = stack.pop()
        real = [c for c in frame.children if not c.function.startswith("[")]
        path = frame.file_path or parent_path  # a synthetic frame ([self], [await]) is its caller's
        own = frame.time - sum(c.time for c in real)
        if own > 0:
            name = f"{frame.function}  {frame.file_path_short or '?'}:{frame.line_no or '?'}"
            frames[name] += own
            areas[_area(path)] += own
        stack.extend((c, path) for c in real)
    return frames, areas


def _area(path: str) -> str:
    return next((area for area, parts in AREAS if any(part in path for part in parts)), "other")
