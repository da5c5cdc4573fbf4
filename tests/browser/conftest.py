"""Fixtures for driving the site in a real browser: the project's ASGI app served by daphne (HTTP and
WebSocket) on a free loopback port, the real Celery worker behind it, Debian's Chromium under Playwright,
and a folder the screenshots of every page go to.

Everything talks through real services: the server and the worker are other processes on the test
database (so the tests that use them are transactional: they see only committed rows) and on the
worker's own Redis database, which is also the channel layer the worker's `ready` event travels through.
"""

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, RunningWorker, worker_database_url
from tests.processes import site_env, site_server_start
from tests.worker.conftest import tiny_checkpoint  # noqa: F401  (the same tiny real model as the worker tests)

CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests may run as root
    "--disable-gpu",
    # No calls home: this machine has no network, and each refused connection costs time.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
OUTPUT = Path(__file__).resolve().parent / "output"
DOCS_SCREENSHOTS = REPO / "docs" / "screenshots"
DOC_COPIES = os.environ.get("FSPO_DOC_SCREENSHOTS") == "1"


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:<port>, no trailing slash
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def log_size(self) -> int:
        return self.log.stat().st_size

    def errors_since(self, offset: int) -> list[str]:
        """The server's error and warning lines logged after `offset`: tracebacks, and Django's warnings of
        4xx/5xx answers."""
        with self.log.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
        return [line for line in lines if re.search(r" (WARNING|ERROR|CRITICAL) |^Traceback", line)]


@pytest.fixture(scope="package")
def asgi_server(
    tmp_path_factory: pytest.TempPathFactory, celery_worker: RunningWorker
) -> Iterator[LiveServer]:
    """daphne serving the project's ASGI app on a port the OS picks, on the test database and on the
    worker's Redis database (its Celery broker, so a last pick's `personalize` reaches the test worker,
    and the channel layer the worker's updates come back through)."""
    database_url = worker_database_url()
    if database_url is None:
        pytest.fail("the browser tests need PostgreSQL: run them with ./run test (it sets DATABASE_URL)")
    env = site_env(database_url=database_url, redis_url=celery_worker.redis_url)
    site = site_server_start(tmp_path_factory.mktemp("daphne"), env=env)
    try:
        yield LiveServer(url=site.url, log=site.log)
    finally:
        site.stop()


@contextmanager
def queue_paused(worker: RunningWorker, queue: str) -> Iterator[None]:
    """The worker takes nothing from `queue` inside the block: what is sent there waits, and is handled
    once the block ends (with Celery's own remote control, as an operator would pause a queue)."""
    # limit=1: the one worker's reply ends the wait (a broadcast otherwise waits out its timeout).
    control = worker.app.control
    assert control.cancel_consumer(queue, reply=True, limit=1, timeout=10), worker.log_tail()
    try:
        yield
    finally:
        assert control.add_consumer(queue, reply=True, limit=1, timeout=10), worker.log_tail()


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """Debian's headless Chromium under Playwright (Playwright's own browser download needs a network).

    Playwright's sync API keeps an event loop running in this thread, which makes Django refuse its
    (sync) database calls as if they came from async code; the test's own queries are plain sync code, so
    the check is lifted while the browser is open. Module scope: later tests get their thread back."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium (.ci/run does)")
    saved = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()
        if saved is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = saved


def small_png(source: Path, target: Path, colors: int = 64) -> None:
    """A copy of a screenshot in a 64-colour palette: a third of the size, and text stays crisp."""
    from PIL import Image

    with Image.open(source) as image:
        palette = image.convert("RGB").quantize(colors, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette.save(target, optimize=True)


class Screenshots:
    """Full-page screenshots named `<prefix>-<nn>-<name>.png`, numbered in the order taken, written to
    tests/browser/output/ and, with FSPO_DOC_SCREENSHOTS=1 set, in a smaller palette copy to
    docs/screenshots/ (the pictures the docs show; opt-in so a test run leaves the work tree clean)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.taken: list[Path] = []

    def take(self, page: object, name: str) -> Path:
        path = OUTPUT / f"{self.prefix}-{len(self.taken) + 1:02d}-{name}.png"
        # Animations stopped and the caret hidden: the same page gives the same picture.
        page.screenshot(path=str(path), full_page=True, animations="disabled", caret="hide")  # type: ignore[attr-defined]
        if DOC_COPIES:
            small_png(path, DOCS_SCREENSHOTS / path.name)
        self.taken.append(path)
        return path


@pytest.fixture
def screenshots(request: pytest.FixtureRequest) -> Screenshots:
    """Screenshots for this test, under the prefix its module names in `SCREENSHOTS_PREFIX`, else one from
    its parameters (e.g. `desktop`, `mobile`), else its name."""
    callspec = getattr(request.node, "callspec", None)
    prefix = getattr(request.module, "SCREENSHOTS_PREFIX", None) or (
        "-".join(str(v) for v in callspec.params.values()) if callspec else request.node.name
    )
    for folder in (OUTPUT, DOCS_SCREENSHOTS) if DOC_COPIES else (OUTPUT,):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{prefix}-*.png"):  # a page the journey no longer has leaves no picture
            old.unlink()
    return Screenshots(prefix)
