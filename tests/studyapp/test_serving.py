"""The production web server (`./run serve`, studyapp.serving): its command line from the environment, and
the real thing, gunicorn with two uvicorn workers on the test database behind a pretend TLS proxy,
serving a page, a collected static file and the participant's WebSocket, then stopping on SIGTERM."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from studyapp.demo_site import Child
from studyapp.models import Participant
from studyapp.realtime import notify_participant
from studyapp.serving import WebServer, gunicorn_argv, web_server_from_env
from tests.conftest import REPO, stop_process, worker_database_url
from tests.factories import make_study
from tests.support import process_alive

LISTENING = re.compile(r"Listening at: http://(127\.0\.0\.1:\d+)")
BOOTED = re.compile(r"Booting worker with pid: (\d+)")
STARTED = re.compile(r"Application startup complete")
# What a proxy on this host adds to every request it passes on from a browser on https://.
FROM_THE_PROXY = {"x-forwarded-proto": "https"}


def test_it_runs_one_uvicorn_worker_per_cpu_and_no_fewer_than_two(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEB_WORKERS", raising=False)
    monkeypatch.setattr("studyapp.serving.cpu_count", lambda: 1)
    assert web_server_from_env().workers == 2
    monkeypatch.setattr("studyapp.serving.cpu_count", lambda: 6)
    assert web_server_from_env().workers == 6


def test_it_builds_gunicorns_command_line_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "WEB_BIND": "0.0.0.0:9000",
        "WEB_WORKERS": "3",
        "WEB_GRACEFUL_TIMEOUT_S": "12",
    }.items():
        monkeypatch.setenv(name, value)

    argv = gunicorn_argv(web_server_from_env())

    assert argv[0] == "studyapp.asgi:application"
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert options["--worker-class"] == "uvicorn_worker.UvicornWorker"
    assert (options["--bind"], options["--workers"], options["--graceful-timeout"]) == (
        "0.0.0.0:9000",
        "3",
        "12",
    )
    assert "--access-logfile" not in argv
    assert "--access-logfile" in gunicorn_argv(WebServer(access_log=True))


@pytest.fixture
def production_server(tmp_path: Path) -> Iterator[tuple[str, Child]]:
    """`python -m studyapp.serving` (what `./run serve` runs after collectstatic) with 2 workers on a
    free port, HTTPS on, the static files collected into tmp_path; (its URL, the master)."""
    database_url = worker_database_url()
    if database_url is None:
        pytest.fail("the server test needs PostgreSQL: run it with ./run test (it sets DATABASE_URL)")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DEBUG", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
    }
    env.update(
        DATABASE_URL=database_url,
        DB_POOL_MAX_SIZE="2",
        HTTPS="true",
        STATIC_COLLECTED="true",
        STATIC_ROOT=str(tmp_path / "static"),
        WEB_BIND="127.0.0.1:0",
        WEB_WORKERS="2",
    )
    collect = [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"]
    subprocess.run(collect, cwd=REPO, env=env, check=True, timeout=120)
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        argv = [sys.executable, "-m", "studyapp.serving"]
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    master = Child("server", proc, log)
    try:
        url = f"http://{master.wait_for(LISTENING, 60)[1]}"
        deadline = time.monotonic() + 60
        while len(STARTED.findall(log.read_text(errors="replace"))) < 2:  # both workers are serving
            assert proc.poll() is None and time.monotonic() < deadline, master.log_tail()
            time.sleep(0.1)
        yield url, master
    finally:
        stop_process(proc, timeout=40)


def _session_cookie(response: httpx.Response) -> str:
    """The session cookie the site set, as the browser sends it back (httpx keeps a Secure cookie from
    an http:// URL to itself)."""
    return f"sessionid={response.cookies['sessionid']}"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)  # the server's processes see only committed rows
def test_the_production_server_serves_pages_static_files_and_sockets_then_stops_on_sigterm(
    production_server: tuple[str, Child],
) -> None:
    url, master = production_server
    study = make_study()
    with httpx.Client(base_url=url, timeout=30) as http:
        # Plain HTTP is sent to https://; through the proxy a newcomer is sent to consent, and enrolled
        # when they agree.
        assert http.get(f"/s/{study.slug}/").headers["location"].startswith("https://")
        entry = http.get(f"/s/{study.slug}/", headers=FROM_THE_PROXY)
        assert (entry.status_code, entry.headers["location"]) == (302, f"/s/{study.slug}/consent/")
        page = http.get(entry.headers["location"], headers=FROM_THE_PROXY)
        assert page.status_code == 200 and "You agree to take part." in page.text
        form = dict(re.findall(r'name="(csrfmiddlewaretoken|enrolment)" value="([^"]+)"', page.text))
        csrf_cookie = f"csrftoken={page.cookies['csrftoken']}"
        agreed = http.post(
            entry.headers["location"],
            data={**form, "decision": "agree"},
            headers={
                **FROM_THE_PROXY,
                "cookie": csrf_cookie,
                "referer": f"https://{url.removeprefix('http://')}/",
            },
        )
        assert agreed.status_code == 302, agreed.text
        cookie = _session_cookie(agreed)
        # The stylesheet under its content-hashed name, compressed, cached for good.
        stylesheet = re.search(r'href="(/static/studyapp/participant\.[0-9a-f]{12}\.css)"', page.text)
        assert stylesheet, page.text
        css = http.get(stylesheet[1], headers={**FROM_THE_PROXY, "accept-encoding": "br, gzip"})
        assert css.status_code == 200 and css.headers["content-encoding"] in ("br", "gzip")
        assert "immutable" in css.headers["cache-control"]
    token = Participant.objects.get(study=study).token

    headers = {**FROM_THE_PROXY, "cookie": cookie}
    with connect(
        f"ws://{url.removeprefix('http://')}/ws/participants/{token}/",
        origin=url,  # type: ignore[arg-type]  # websockets types it as its Origin, a str
        additional_headers=headers,
        open_timeout=30,
    ) as socket:
        first = json.loads(socket.recv(timeout=10))
        # Sent from this process through the Redis channel layer to whichever worker holds the socket.
        notify_participant(token, {"state": "rating", "ready": True})
        pushed = json.loads(socket.recv(timeout=10))
    assert first["state"] == "instructions"
    assert pushed == {"state": "rating", "ready": True}

    workers = [int(pid) for pid in BOOTED.findall(master.log.read_text())]
    master.proc.send_signal(signal.SIGTERM)
    assert master.proc.wait(timeout=40) == 0, master.log_tail()
    assert len(workers) == 2 and not any(process_alive(pid) for pid in workers), master.log_tail()
    assert "Shutting down: Master" in master.log.read_text()
