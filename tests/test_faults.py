"""The site under faults of the processes it runs on (issue 19), with real processes and no mocks: the
site itself (daphne) SIGKILLed and started again, its Redis (the channel layer, the Celery broker and
result backend) killed and started again, and its PostgreSQL stopped and started again, each while a
scripted participant (studyapp.scripted_participant, over HTTP) is on their way.

Whatever fails, no page answers a server error (5xx; a database that is down answers a short 503 page),
the participant carries on from the step they were on, a replayed POST changes nothing, and every pick
is stored once or not at all."""

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from asgiref.sync import sync_to_async
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from annotation.models import ElicitationPick
from studyapp.models import Participant, Study
from studyapp.queue import GPU
from studyapp.scripted_participant import CheckFailed, PrefersShort, ScriptedParticipant, form_field, step_of
from studyapp.services import recruitment_id_hash
from tests.conftest import worker_database_url
from tests.factories import make_coordinator, make_study
from tests.processes import (
    PostgresCluster,
    RedisServer,
    Site,
    django_run,
    site_env,
    site_server_start,
)
from tests.support import run_async

pytestmark = pytest.mark.slow

UNAVAILABLE = "The study is briefly unavailable, please retry in a minute"
COORDINATOR_PASSWORD = "a-long-test-password"  # tests.factories.make_coordinator's


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("the fault tests start a Redis of their own: apt-get install redis-server")
    server = RedisServer(tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def suite_database_url() -> str:
    url = worker_database_url()
    if url is None:
        pytest.fail("the fault tests need PostgreSQL: run them with ./run test (it sets DATABASE_URL)")
    return url


class Restartable:
    """The site process, started again on the same port (the participant's links stay good) after it
    is killed; each start logs to a folder of its own."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env, self.starts = log_dir, env, 1
        self.site = site_server_start(log_dir / "start-1", env=env)
        self.port = urlsplit(self.site.url).port or 0

    def kill_and_restart(self) -> None:
        self.site.kill()
        self.starts += 1
        self.site = site_server_start(self.log_dir / f"start-{self.starts}", env=self.env, port=self.port)


def participant_on(site: Site, slug: str, recruitment_id: str) -> ScriptedParticipant:
    return ScriptedParticipant(site.url, slug, recruitment_id, chooser=PrefersShort(), request_timeout_s=30)


async def consent_page(p: ScriptedParticipant) -> httpx.Response:
    """From the entry link to the consent page (a newcomer's: nothing is stored yet)."""
    r = await p.follow(await p.send("GET entry", "GET", p.root, params=p.entry))
    p.expect(r, "consent/", "the consent page")
    return r


async def consent(p: ScriptedParticipant, page: httpx.Response) -> httpx.Response:
    """Agree on the consent page: enrolled, on the instructions."""
    data = {"decision": "agree", "enrolment": form_field(page.text, "enrolment")}
    r = await p.follow(await p.post("POST consent", page, data))
    p.expect(r, "instructions/", "the instructions")
    return r


async def instructions_done(p: ScriptedParticipant, page: httpx.Response) -> httpx.Response:
    """Go on from the instructions: on the first pick."""
    r = await p.follow(await p.post("POST instructions", page, {}))
    p.expect(r, "pick/1/", "the first pick")
    return r


async def pick(p: ScriptedParticipant, page: httpx.Response) -> httpx.Response:
    """Answer the pick page `page`; the page the participant is sent on to."""
    data = {"item": form_field(page.text, "item"), "choice": p.chooser.side(page.text)}
    return await p.follow(await p.post("POST pick", page, data))


async def current_page(p: ScriptedParticipant) -> httpx.Response:
    """What the participant sees when they come back (their study link, without its parameters)."""
    return await p.follow(await p.send("GET entry", "GET", p.root))


async def replay(p: ScriptedParticipant, page: httpx.Response, data: dict[str, str], now_at: str) -> None:
    """POST an earlier page's form again: it must be sent to `now_at`, the step after that form's."""
    response = await p.post("POST (replayed)", page, data)
    p.expect_redirect(response, "the replayed POST", f"{p.root}{now_at}")


def participant_of(recruitment_id: str) -> Participant:
    return Participant.objects.get(recruitment_id_hash=recruitment_id_hash(recruitment_id))


def picks_stored(recruitment_id: str) -> tuple[int, int, int]:
    """The participant's picks done (their row's count), pick rows, and items those rows answer."""
    participant = participant_of(recruitment_id)
    rows = ElicitationPick.objects.filter(item__participant=participant)
    return participant.picks_done, rows.count(), rows.values("item").distinct().count()


# ---------------------------------------------------------------------------------------------------
# The site process SIGKILLed


@pytest.mark.django_db(transaction=True)
def test_a_participant_resumes_their_step_after_the_site_is_killed_three_times(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    study = make_study(n_pairs=3)
    site = Restartable(tmp_path, site_env(database_url=suite_database_url(), redis_url=private_redis.url))
    try:
        run_async(_killed_three_times(site, study, "killed-site"))
    finally:
        site.site.stop()

    participant = Participant.objects.get(study=study)
    assert participant.state == Participant.State.WAITING
    assert picks_stored("killed-site") == (participant.n_picks,) * 3


async def _killed_three_times(site: Restartable, study: Study, recruitment_id: str) -> None:
    p = participant_on(site.site, study.slug, recruitment_id)
    try:
        # Killed once they have consented: they come back to the instructions, and the consent form
        # sent again enrols nobody else.
        consent_form = await consent_page(p)
        r = await consent(p, consent_form)
        site.kill_and_restart()
        p.expect(await current_page(p), "instructions/", "the instructions after a restart")
        agreed = {"decision": "agree", "enrolment": form_field(consent_form.text, "enrolment")}
        await replay(p, consent_form, agreed, "instructions/")
        assert await sync_to_async(Participant.objects.filter(study=study).count)() == 1

        # Killed while their second pick is on its way: it is stored or not, and they come back to the
        # pick after the last one stored. Sent again (as a browser resends a form it had no answer
        # for), it is stored once either way.
        r = await pick(p, await instructions_done(p, r))
        p.expect(r, "pick/2/", "the second pick")
        second = {"item": form_field(r.text, "item"), "choice": p.chooser.side(r.text)}
        sending = asyncio.create_task(p.post("POST pick", r, second))
        await asyncio.sleep(0.01)
        site.kill_and_restart()
        (outcome,) = await asyncio.gather(sending, return_exceptions=True)
        cut_off = isinstance(outcome, CheckFailed) and outcome.category == "connection"
        assert cut_off or (isinstance(outcome, httpx.Response) and outcome.is_redirect), outcome
        done, rows, _ = await sync_to_async(picks_stored)(recruitment_id)
        assert done == rows in (1, 2)
        p.expect(await current_page(p), f"pick/{done + 1}/", "the pick after the last one stored")
        await replay(p, r, second, "pick/3/")
        assert await sync_to_async(picks_stored)(recruitment_id) == (2, 2, 2)

        # Killed once they have made every pick: they come back to the waiting page, and the last pick
        # sent again stores nothing.
        r = await current_page(p)
        while step_of(r.url.path) == "pick":
            last_page, r = r, await pick(p, r)
        p.expect(r, "waiting/", "the waiting page after the last pick")
        site.kill_and_restart()
        p.expect(await current_page(p), "waiting/", "the waiting page after a restart")
        last = {"item": form_field(last_page.text, "item"), "choice": p.chooser.side(last_page.text)}
        await replay(p, last_page, last, "waiting/")
        status = (await p.send("GET status", "GET", f"{p.root}status/")).json()
        assert status["state"] == "waiting"
    finally:
        await p.client.aclose()


# ---------------------------------------------------------------------------------------------------
# Redis down


@pytest.mark.django_db(transaction=True)
def test_no_page_fails_while_redis_is_down_and_the_site_recovers_when_it_is_back(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    study = make_study(n_pairs=3)
    coordinator = make_coordinator()
    env = site_env(database_url=suite_database_url(), redis_url=private_redis.url)
    site = site_server_start(tmp_path / "site", env=env)
    try:
        run_async(_redis_down(site, private_redis, study, coordinator.username))
    finally:
        site.stop()

    assert picks_stored("waits") == (participant_of("waits").n_picks,) * 3
    assert participant_of("leaves").state == Participant.State.WITHDRAWN
    # One personalize reached the broker: the retry once Redis was back (none was sent while it was down).
    with redis.Redis.from_url(private_redis.url) as broker:
        assert broker.llen(GPU) == 1


async def socket_status(site: Site, p: ScriptedParticipant, token: str) -> dict[str, Any] | None:
    """The first message of the participant's status socket (their waiting page's), or None when the
    socket cannot be opened or sends nothing."""
    url = site.url.replace("http://", "ws://") + f"/ws/participants/{token}/"
    cookie = "; ".join(f"{name}={value}" for name, value in p.client.cookies.items())
    try:
        async with connect(
            url, origin=site.url, additional_headers={"Cookie": cookie}, open_timeout=15
        ) as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), 15))
    except (WebSocketException, OSError, TimeoutError):
        return None


async def coordinator_signed_in(site: Site, username: str) -> ScriptedParticipant:
    """A coordinator's browser, signed in (the scripted participant's requests: cookies, CSRF, every
    answer below 400)."""
    c = ScriptedParticipant(site.url, "-", "-", chooser=PrefersShort(), request_timeout_s=30)
    page = await c.send("GET login", "GET", "/studio/login/")
    credentials = {"username": username, "password": COORDINATOR_PASSWORD}
    home = await c.follow(await c.post("POST login", page, credentials))
    assert home.url.path == "/studio/", home.url
    return c


async def retry_generation(c: ScriptedParticipant, slug: str, token: str) -> None:
    """The coordinator's "Retry generation" on the participant list of the study's dashboard."""
    dashboard = await c.send("GET dashboard", "GET", f"/studio/studies/{slug}/")
    action = f"/studio/studies/{slug}/participants/{token}/retry-generation/"
    assert f'action="{action}"' in dashboard.text, "no retry for the participant on the dashboard"
    data = {"csrfmiddlewaretoken": form_field(dashboard.text, "csrfmiddlewaretoken")}
    await c.follow(await c.send("POST retry generation", "POST", action, data))


async def _redis_down(site: Site, redis_server: RedisServer, study: Study, username: str) -> None:
    # `waits` goes on to the waiting page while Redis is down; `leaves` withdraws while it is down.
    waits, leaves = (participant_on(site, study.slug, rid) for rid in ("waits", "leaves"))
    c = None
    try:
        waits_consent = await consent_page(waits)
        await instructions_done(leaves, await consent(leaves, await consent_page(leaves)))
        redis_server.kill()

        # The participant flow: consent, every pick, the waiting page and its status, a withdrawal.
        r = await instructions_done(waits, await consent(waits, waits_consent))
        while step_of(r.url.path) == "pick":
            r = await pick(waits, r)
        waits.expect(r, "waiting/", "the waiting page after the last pick")
        status = (await waits.send("GET status", "GET", f"{waits.root}status/")).json()
        assert status == {"state": "waiting", "generation": "queued", "delayed": True}
        token = (await sync_to_async(participant_of)("waits")).token
        assert await socket_status(site, waits, token) is None  # the page polls instead

        withdraw_page = await leaves.send("GET withdraw", "GET", f"{leaves.root}withdraw/")
        r = await leaves.follow(await leaves.post("POST withdraw", withdraw_page, {}))
        leaves.expect(r, "done/", "the done page after withdrawing")

        # The coordinator's: sign in, the dashboard and its participant list, a retry of the generation
        # (the broker still cannot take it: it stays delayed).
        c = await coordinator_signed_in(site, username)
        await c.send("GET dashboard.json", "GET", f"/studio/studies/{study.slug}/dashboard.json")
        await c.send(
            "GET participants", "GET", f"/studio/studies/{study.slug}/", params={"participant": token[:8]}
        )
        await retry_generation(c, study.slug, token)
        assert (await waits.send("GET status", "GET", f"{waits.root}status/")).json()["delayed"] is True

        # Redis back on the same port: the same site process sends the retried generation and opens
        # the socket again.
        redis_server.start()
        await retry_generation(c, study.slug, token)
        status = (await waits.send("GET status", "GET", f"{waits.root}status/")).json()
        assert status == {"state": "waiting", "generation": "queued", "delayed": False}
        assert await socket_status(site, waits, token) == status
    finally:
        for client in (waits, leaves, c):
            if client is not None:
                await client.client.aclose()


# ---------------------------------------------------------------------------------------------------
# PostgreSQL restarted


@pytest.fixture
def private_postgres() -> Iterator[PostgresCluster]:
    if os.geteuid() != 0:
        pytest.fail("the PostgreSQL fault test needs root: it runs initdb and pg_ctl as the postgres user")
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def test_pages_answer_unavailable_while_postgres_is_down_and_the_same_site_recovers(
    tmp_path: Path, private_postgres: PostgresCluster, private_redis: RedisServer
) -> None:
    private_postgres.create_database("fspo")
    database_url = private_postgres.url("fspo")
    slug = django_run(
        "from django.core.management import call_command\n"
        "call_command('migrate', verbosity=0)\n"
        "from tests.factories import make_study\n"
        "print(make_study(n_pairs=3).slug)",
        database_url=database_url,
    ).strip()
    # A request waits at most 2 s for a connection from the pool (then it answers 503).
    env = site_env(database_url=database_url, redis_url=private_redis.url, DB_POOL_TIMEOUT="2")
    site = site_server_start(tmp_path / "site", env=env)
    try:
        asyncio.run(_postgres_restarted(site, private_postgres, slug, database_url))
    finally:
        site.stop()

    counts = _stored_picks(database_url, "pg-restart")
    assert counts["state"] == "waiting"
    assert counts["picks_done"] == counts["rows"] == counts["items"] == counts["n_picks"]


def _stored_picks(database_url: str, recruitment_id: str) -> dict[str, Any]:
    """picks_stored in a process on the private cluster's database, with the participant's state and
    how many picks they make."""
    code = (
        "import json\n"
        "from tests.test_faults import participant_of, picks_stored\n"
        f"p = participant_of({recruitment_id!r})\n"
        f"done, rows, items = picks_stored({recruitment_id!r})\n"
        "print(json.dumps(dict(state=p.state, n_picks=p.n_picks, picks_done=done, rows=rows, items=items)))"
    )
    return json.loads(django_run(code, database_url=database_url))


async def unavailable_or_ok(
    p: ScriptedParticipant, method: str, url: str, data: Any = None
) -> httpx.Response:
    """A request while the database is down: a success, or the short 503 page, never anything else."""
    r = await p.client.request(method, url, data=data)
    assert r.status_code < 400 or (r.status_code == 503 and UNAVAILABLE in r.text), (
        r.status_code,
        r.text[:500],
    )
    return r


async def _postgres_restarted(site: Site, cluster: PostgresCluster, slug: str, database_url: str) -> None:
    p = participant_on(site, slug, "pg-restart")
    pid = site.child.proc.pid
    try:
        r = await consent(p, await consent_page(p))
        # Restarted between two requests: the pool's idle connections are dead, and it lends none of
        # them (each is checked first), so the participant never notices.
        await asyncio.to_thread(cluster.stop)
        await asyncio.to_thread(cluster.start)
        r = await pick(p, await instructions_done(p, r))
        p.expect(r, "pick/2/", "the second pick")
        second_page = r

        # Stopped while the second pick is on its way, then every page tried while it is down.
        second = {"item": form_field(r.text, "item"), "choice": p.chooser.side(r.text)}
        token = form_field(r.text, "csrfmiddlewaretoken")
        path = r.url.path
        sent = asyncio.create_task(
            unavailable_or_ok(p, "POST", path, {"csrfmiddlewaretoken": token, **second})
        )
        await asyncio.to_thread(cluster.stop)
        await sent
        down = [
            await unavailable_or_ok(p, "GET", p.root),
            await unavailable_or_ok(p, "GET", f"{p.root}status/"),
            await unavailable_or_ok(p, "POST", path, {"csrfmiddlewaretoken": token, **second}),
        ]
        assert {response.status_code for response in down} == {503}

        # Started again: the same process answers again, from the pick after the last one stored.
        await asyncio.to_thread(cluster.start)
        for _ in range(60):
            back = await unavailable_or_ok(p, "GET", p.root)
            if back.status_code < 400:
                break
            await asyncio.sleep(1)
        assert site.child.proc.pid == pid and site.child.proc.poll() is None
        stored = await asyncio.to_thread(_stored_picks, database_url, "pg-restart")
        assert stored["picks_done"] == stored["rows"] == stored["items"] in (1, 2)
        r = await current_page(p)
        p.expect(r, f"pick/{stored['picks_done'] + 1}/", "the pick after the last one stored")
        # The second pick sent again: stored once, whether the first try was or not.
        await replay(p, second_page, second, "pick/3/")
        stored = await asyncio.to_thread(_stored_picks, database_url, "pg-restart")
        assert stored["picks_done"] == stored["rows"] == stored["items"] == 2
        r = await current_page(p)
        while step_of(r.url.path) == "pick":
            r = await pick(p, r)
        p.expect(r, "waiting/", "the waiting page after the last pick")
    finally:
        await p.client.aclose()
