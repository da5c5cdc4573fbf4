"""Fixtures shared by the suite.

- `celery_worker`: a real `celery worker` process (queues cpu and gpu) on a Redis database of its own,
  and a client app that talks to it. It uses the test database, so tasks see rows that a transactional
  test (`django_db(transaction=True)`) has committed.
- `broker_unreachable`: tasks this process enqueues go to a broker that refuses every connection (a
  closed port on this machine), as when the broker is down.

The settings need SECRET_KEY and PARTICIPANT_ID_KEY (DEBUG is off by default): `./run test` gives the
test run its own.
"""

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery, current_app

REPO = Path(__file__).resolve().parent.parent
# The worker's own Redis database: flushed at start, so messages left by an earlier run (or by anything
# using REDIS_URL's database) never reach it. TEST_WORKER_REDIS_DB lets two suites share one Redis.
WORKER_REDIS_DB = int(os.environ.get("TEST_WORKER_REDIS_DB", "5"))


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate a child process, killing it if it does not exit within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class RunningWorker:
    app: Celery  # a client on the worker's broker and result backend
    redis_url: str  # the worker's Redis database: broker, results and channel layer
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def worker_database_url() -> str | None:
    """DATABASE_URL pointed at the database the tests run on (test_<name>), or None without PostgreSQL."""
    from django.db import connection

    base = os.environ.get("DATABASE_URL", "")
    if not base.startswith("postgres"):
        return None
    return urlsplit(base)._replace(path=f"/{connection.settings_dict['NAME']}").geturl()


def worker_redis_url(db: int) -> str:
    """REDIS_URL's server, database `db`: a worker's broker, results and channel layer."""
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        pytest.fail("the Celery worker tests need Redis: run them with ./run test (it sets REDIS_URL)")
    return urlsplit(redis_url)._replace(path=f"/{db}").geturl()


def worker_client(redis_url: str) -> Celery:
    """A Celery app configured as the site's, on `redis_url` (broker and result backend)."""
    client = Celery("fspo-tests", set_as_current=False)
    client.config_from_object("django.conf:settings", namespace="CELERY")
    client.conf.update(broker_url=redis_url, result_backend=redis_url)
    return client


def start_celery_worker(
    client: Celery, redis_url: str, log: Path, *, env: dict[str, str] | None = None, beat: bool = False
) -> subprocess.Popen:
    """A real `celery worker` process (queues cpu and gpu, solo pool, concurrency 1, as a GPU host runs
    one) on `redis_url` and the test database, with `env` added to its environment and, with `beat`,
    Celery beat embedded (-B: the expiry and stale-work sweeps); returned once it says it is ready."""
    worker_env = {
        k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
    }
    worker_env["REDIS_URL"] = redis_url
    if database_url := worker_database_url():
        worker_env["DATABASE_URL"] = database_url
    # No connection outlives its task (so the test database can be dropped at the end), and a failed task
    # is retried at once instead of after the production back-off.
    worker_env.update(DB_CONN_MAX_AGE="0", PERSONALIZE_RETRY_DELAY_S="0", **(env or {}))
    hostname = f"pytest-{uuid.uuid4().hex[:8]}@%h"
    celery = Path(sys.executable).with_name("celery")
    options = ["--queues", "cpu,gpu", "--concurrency", "1", "--pool", "solo", "--loglevel", "info"]
    if beat:
        options += ["--beat", "--schedule", str(log.with_suffix(".beat-schedule"))]
    with log.open("wb") as out:
        argv = [str(celery), "-A", "studyapp", "worker", *options, "--hostname", hostname]
        proc = subprocess.Popen(argv, cwd=REPO, env=worker_env, stdout=out, stderr=subprocess.STDOUT)
    worker = RunningWorker(app=client, redis_url=redis_url, log=log)
    name = hostname.removesuffix("@%h")
    # Its "ready" line, not a ping: a solo worker busy with a long task at once answers no ping.
    deadline = time.monotonic() + 60
    while not re.search(rf"{name}@\S+ ready\.", log.read_text(errors="replace")):
        if proc.poll() is not None:
            pytest.fail(f"the celery worker exited with {proc.returncode}:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            stop_process(proc)
            pytest.fail(f"the celery worker was not ready within 60 s:\n{worker.log_tail()}")
        time.sleep(0.1)
    return proc


@pytest.fixture(scope="session")
def celery_worker(tmp_path_factory: pytest.TempPathFactory, django_db_setup: None) -> Iterator[RunningWorker]:
    url = worker_redis_url(WORKER_REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    client = worker_client(url)
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    proc = start_celery_worker(client, url, log)
    try:
        yield RunningWorker(app=client, redis_url=url, log=log)
    finally:
        stop_process(proc, timeout=15)
        client.close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (one just handed out by the system, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tasks_sent_through(app: Celery) -> Iterator[Celery]:
    """Make `app` the Celery app that enqueued tasks go through (studyapp.queue sends through the current
    app), in this thread and, as the default, in the others; the previous one afterwards."""
    previous = current_app._get_current_object()
    app.set_current()
    app.set_default()
    try:
        yield app
    finally:
        previous.set_current()
        previous.set_default()


def unreachable_broker_app() -> Celery:
    """A Celery app configured as the site's, on a broker (and result backend) that refuses every
    connection."""
    return worker_client(f"redis://127.0.0.1:{closed_port()}/0")


@pytest.fixture
def broker_unreachable() -> Iterator[Celery]:
    client = unreachable_broker_app()
    with tasks_sent_through(client):
        yield client
    client.close()


@pytest.fixture(scope="session")
def llmfao_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLMFAO's files with the crowd's judgments between the 6 most judged models (269 judgments by 68
    workers, ties and decisive ones: enough for a Bradley-Terry ranking) and the judges' rows of them, from
    the shared data."""
    from tests.modeling.test_llmfao import shared_source, small_copy

    full = shared_source()
    return small_copy(full, tmp_path_factory.mktemp("llmfao-slice") / "source", models=6)
