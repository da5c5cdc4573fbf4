"""The whole platform on one machine, as `./run demo` starts it after training (`manage.py demo_site`).

It migrates the database, makes sure the demo study (its question pool from a synthetic dataset, an
FSPO arm with the participant's picks as shots against the base model with no context) and a coordinator
account exist, starts a Celery worker (queues gpu and cpu, one process, solo pool) and daphne (HTTP,
WebSocket and the static files), prints where to go, and serves until Ctrl-C; then it stops both. A rerun
reuses the database, the study and the account.

With `check`, one scripted participant (studyapp.scripted_participant) takes the study over real HTTP instead, and
the run ends once they have their completion code, or with DemoSiteFailed.

Which database, broker and channel layer it runs on is the settings' business (the environment): `./run
demo` gives it SQLite and the SQLAlchemy broker under var/demo/site/ and the in-memory channel layer. That
layer lives inside one process, so the worker's "ready" never reaches the server's sockets; the live
pages poll instead (studyapp.realtime.live_socket_path).
"""

import asyncio
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command

from annotation.models import GeneratedResponse
from annotation.pool import pool_from_dataset
from studyapp.models import Arm, Participant, Study
from studyapp.scripted_participant import CheckFailed, PrefersShort, ScriptedParticipant
from studyapp.services import ArmSpec, recruitment_id_hash, study_create

REPO = Path(__file__).resolve().parent.parent
COORDINATOR = "coordinator"
CONSENT_TEXT = (
    "This is a demonstration of the FSPO study platform, running on this computer.\n\n"
    "You will first choose, for a few questions, the explanation that suits you better. A small model "
    "trained on synthetic users then writes explanations of new questions with your choices in mind, and "
    "you compare them with explanations written without them. It takes about five minutes.\n\n"
    "Your choices are stored under a random id in a database on this machine and go nowhere else. You can "
    "withdraw at any time, and your data is then deleted."
)
WORKER_READY = re.compile(r"@\S+ ready\.")
SERVER_LISTENING = re.compile(r"Listening on TCP address ([\d.]+:\d+)")
START_TIMEOUT_S = 90  # a cold start of both processes on a busy two-core machine
STOP_TIMEOUT_S = 30  # a worker finishes the participant it is writing for before it exits


class DemoSiteFailed(Exception):
    """The site could not start, or the check's participant did not finish."""


@dataclass(frozen=True)
class DemoStudy:
    """The demo study: its pool from `dataset`, arms FSPO (`fspo` with the picks as shots) and base
    (`base`, no user context), compared FSPO against base."""

    slug: str
    dataset: Path
    fspo: Path
    base: Path
    n_pairs: int = 4
    n_eval_questions: int = 4
    max_new_tokens: int = 120
    pool_pairs: int = 16  # the pool participants' pairs and questions are drawn from
    pool_questions: int = 12


def demo_study_ensure(spec: DemoStudy) -> tuple[Study, bool]:
    """The study named `spec.slug`, created (open, with its pool, arms and comparison) if it does not
    exist yet; (study, created). An existing study is returned as it is, whatever `spec` says."""
    study = Study.objects.filter(slug=spec.slug).first()
    if study is not None:
        return study, False
    pool = pool_from_dataset(
        spec.dataset, elicitation=max(spec.pool_pairs, spec.n_pairs), evaluation=spec.pool_questions
    )
    code = spec.slug.upper()
    fields = {
        "title": f"Which explanation suits you? ({spec.slug})",
        "slug": spec.slug,
        "n_pairs": spec.n_pairs,
        "n_eval_questions": spec.n_eval_questions,
        "consistency_repeats": 1,
        "attention_checks": 1,
        "attention_failures_allowed": 0,
        "quota": 1000,  # every `--check` run takes a place
        "consent_text": CONSENT_TEXT,
        "completion_code": f"{code}-DONE",
        "screened_out_code": f"{code}-FULL",
        "failed_attention_code": f"{code}-ATTN",
        "declined_code": f"{code}-DECLINED",
        "max_new_tokens": spec.max_new_tokens,
        "is_open": True,
    }
    arms = [
        ArmSpec("FSPO", Arm.Method.FSPO, str(spec.fspo.resolve())),
        ArmSpec("base", Arm.Method.NO_CONTEXT, str(spec.base.resolve())),
    ]
    return study_create(fields=fields, arms=arms, comparisons=[("FSPO", "base")], pool=pool), True


def demo_coordinator_ensure(*, password_file: Path) -> tuple[str, str]:
    """The demo's coordinator account (a staff user) and its password, kept in `password_file` (readable
    by its owner only): made on the first run, reused afterwards, reset to the file's if it was changed."""
    password = password_file.read_text().strip() if password_file.is_file() else ""
    if not password:
        password = secrets.token_urlsafe(12)
        password_file.parent.mkdir(parents=True, exist_ok=True)
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
    user, _ = User.objects.get_or_create(username=COORDINATOR, defaults={"is_staff": True})
    if not (user.is_staff and user.is_active and user.check_password(password)):
        user.is_staff = user.is_active = True
        user.set_password(password)
        user.save()
    return COORDINATOR, password


# ---------------------------------------------------------------------------------------------------
# The server and the worker


@dataclass
class Child:
    """A process the demo started, and the file its output goes to."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        """Wait until the process's log shows `pattern`; DemoSiteFailed if it exits or times out first."""
        deadline = time.monotonic() + timeout_s
        while True:
            if match := pattern.search(self.log.read_text(errors="replace")):
                return match
            if self.proc.poll() is not None:
                raise DemoSiteFailed(
                    f"the {self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DemoSiteFailed(
                    f"the {self.name} did not start within {timeout_s:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (a Celery worker then finishes its task: a warm shutdown), SIGKILL after `timeout_s`."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _spawn(name: str, argv: list[str], log: Path, env: Mapping[str, str] | None = None) -> Child:
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        # A process group of its own: Ctrl-C reaches only the demo, which then stops its children in order.
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0
        )
    return Child(name, proc, log)


def worker_start(log_dir: Path, *, name: str = "worker", hostname: str = "demo") -> Child:
    """A Celery worker on both queues, as a one-GPU host runs it: one process, one task at a time. No
    gossip, mingle or heartbeats: they are broadcasts between workers (the site bench starts several,
    each its own `name`, log and `hostname`, and none needs the others)."""
    argv = [sys.executable, "-m", "celery", "-A", "studyapp", "worker", "--queues", "gpu,cpu"]
    argv += ["--concurrency", "1", "--pool", "solo", "--prefetch-multiplier", "1", "--loglevel", "info"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    argv += ["--hostname", f"{hostname}-{os.getpid()}@%h"]
    return _spawn(name, argv, log_dir / f"{name.replace(' ', '')}.log")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def server_start(log_dir: Path, *, host: str, port: int, env: Mapping[str, str] | None = None) -> Child:
    """daphne serving the site (HTTP, WebSocket; WhiteNoise the static files) on `host`:`port` (0: any free port), in
    `env` (by default this process's environment)."""
    argv = [sys.executable, "-m", "daphne", "-e", f"tcp:port={port}:interface={host}"]
    argv += ["studyapp.asgi:application"]
    return _spawn("server", argv, log_dir / "server.log", env)


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` may swallow it
    """Ctrl-C, SIGTERM or SIGHUP: stop the site."""


# Ctrl-C; a process manager's or `kill`'s stop; a closed terminal (whose hang-up would otherwise end this
# process at once and leave the server and the worker, in process groups of their own, running).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def interruptible() -> Iterator[None]:
    """The stop signals raise Interrupted inside the block (so `kill` stops the site as Ctrl-C does)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    with _signals_handled_by(interrupt):
        yield


@contextmanager
def signals_ignored() -> Iterator[None]:
    """The stop signals are ignored inside the block."""
    with _signals_handled_by(signal.SIG_IGN):
        yield


@contextmanager
def _signals_handled_by(handler: Any) -> Iterator[None]:
    saved = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


# ---------------------------------------------------------------------------------------------------
# The run


def _describe_backends() -> list[str]:
    db = settings.DATABASES["default"]
    layer = settings.CHANNEL_LAYERS["default"]["BACKEND"]
    lines = [
        f"database       {db['ENGINE'].rsplit('.', 1)[-1]} {db['NAME']}",
        f"task queue     {settings.CELERY_BROKER_URL}",
        f"channel layer  {layer.rsplit('.', 1)[-1]}",
    ]
    if layer.endswith("InMemoryChannelLayer"):
        lines.append(
            "               (in one process: the worker's 'ready' cannot reach the server's sockets, so the "
            "waiting page polls every 3 s instead; that is expected here)"
        )
    return lines


def _report_responses(recruitment_id: str, say: Callable[[str], None]) -> None:
    """What the worker wrote for the check's participant, per arm (read back from the database)."""
    participant = Participant.objects.get(recruitment_id_hash=recruitment_id_hash(recruitment_id))
    for arm in Arm.objects.filter(study=participant.study).order_by("name"):
        rows = list(GeneratedResponse.objects.filter(participant=participant, arm=arm))
        if rows:
            prompt = sum(r.prompt_tokens for r in rows) / len(rows)
            new = sum(r.new_tokens for r in rows) / len(rows)
            say(
                f"  arm {arm.name} ({arm.get_method_display()}): {len(rows)} responses, "
                f"{prompt:.0f} prompt tokens and {new:.0f} new tokens on average"
            )


def demo_site_run(
    spec: DemoStudy,
    *,
    site_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    check: bool = False,
    check_timeout_s: float = 120,
    say: Callable[[str], None] = print,
) -> None:
    """Start the site and serve until interrupted, or with `check` walk one scripted participant through
    it; the server and the worker are stopped either way. Raises DemoSiteFailed when something does
    not work (the message says what, with the end of the process's log)."""
    for path, what in ((spec.dataset, "dataset"), (spec.fspo, "FSPO checkpoint"), (spec.base, "base model")):
        if not path.is_dir():
            raise DemoSiteFailed(f"the {what} {path} does not exist (run `./run demo` to make it)")
    site_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    study, account = _site_prepare(spec, site_dir, say)
    if port and not _port_free(host, port):
        say(f"  port {port} is in use: serving on a free port instead")
        port = 0
    children: list[Child] = []
    try:
        with interruptible():
            try:
                worker, server = _site_start(children, site_dir, host=host, port=port)
                url = f"http://{server.wait_for(SERVER_LISTENING, START_TIMEOUT_S)[1]}"
                worker.wait_for(WORKER_READY, START_TIMEOUT_S)
                say(
                    f"  server pid {server.proc.pid}, worker pid {worker.proc.pid} (queues gpu,cpu, solo pool), "
                    f"up {time.monotonic() - started:.1f} s after the start; logs in {site_dir}/"
                )
                _say_addresses(url, study, account, say)
                if check:
                    _check_showing_the_log(url, study, check_timeout_s, (worker, server), say)
                else:
                    _serve(children, say)
            except Interrupted:
                say("\nStopping ...")
                if check:
                    raise DemoSiteFailed("the check was interrupted before it finished") from None
    finally:
        _site_stop(children, say)


def _site_prepare(
    spec: DemoStudy, site_dir: Path, say: Callable[[str], None]
) -> tuple[Study, tuple[str, str]]:
    """Migrate, make sure the study and the coordinator exist, and say what the site runs on; (the
    study, (the coordinator's username, password))."""
    call_command("migrate", interactive=False, verbosity=0)
    study, created = demo_study_ensure(spec)
    account = demo_coordinator_ensure(password_file=site_dir / "coordinator-password.txt")
    say(f"\nThe study platform ({'new' if created else 'reusing the'} study {study.slug}):")
    for line in _describe_backends():
        say(f"  {line}")
    for arm in study.arms.order_by("name"):
        say(f"  arm {arm.name:<6} {arm.get_method_display()}: {arm.checkpoint}")
    return study, account


def _site_start(children: list[Child], site_dir: Path, *, host: str, port: int) -> tuple[Child, Child]:
    """Start the worker, then the server, each added to `children` as it starts (so that whatever
    started is stopped, whatever fails next); (worker, server)."""
    worker = worker_start(site_dir)
    children.append(worker)
    server = server_start(site_dir, host=host, port=port)
    children.append(server)
    return worker, server


def _site_stop(children: list[Child], say: Callable[[str], None]) -> None:
    with signals_ignored():  # a second Ctrl-C must not leave the worker behind
        for child in reversed(children):  # the server first: no new work reaches the worker
            child.stop()
    if children:
        say(
            f"Server and worker stopped ({', '.join(f'{c.name} exit {c.proc.returncode}' for c in children)})."
        )


def _say_addresses(url: str, study: Study, account: tuple[str, str], say: Callable[[str], None]) -> None:
    username, password = account
    say("")
    say(f"  coordinator    {url}/studio/login/   user {username}   password {password}")
    say(f"  dashboard      {url}/studio/studies/{study.slug}/")
    say(f"  participant    {url}/s/{study.slug}/   (each browser is a new participant)")


def _serve(children: list[Child], say: Callable[[str], None]) -> None:
    say("\nServing until Ctrl-C.")
    while all(child.proc.poll() is None for child in children):
        time.sleep(0.5)
    gone = next(child for child in children if child.proc.poll() is not None)
    raise DemoSiteFailed(f"the {gone.name} exited with status {gone.proc.returncode}:\n{gone.log_tail()}")


def _check_showing_the_log(
    url: str, study: Study, timeout_s: float, children: tuple[Child, Child], say: Callable[[str], None]
) -> None:
    """The check; if it fails, with the end of the worker's log (where a generation's error shows)."""
    worker, server = children
    try:
        _check(url, study, timeout_s, say)
    except DemoSiteFailed as exc:
        raise DemoSiteFailed(
            f"{exc}\n--- the end of {worker.log} (the server's is {server.log}) ---\n{worker.log_tail(15)}"
        ) from None


def _check(url: str, study: Study, timeout_s: float, say: Callable[[str], None]) -> None:
    say(f"\nCheck: one scripted participant takes {url}/s/{study.slug}/ over HTTP")
    participant = ScriptedParticipant(
        url,
        study.slug,
        f"demo-check-{uuid.uuid4().hex[:8]}",
        chooser=PrefersShort(),
        wait_timeout_s=timeout_s,
        completion_code=study.completion_code,
        say=say,
    )
    try:
        walk = asyncio.run(participant.walk())
    except CheckFailed as exc:
        row = Participant.objects.filter(
            recruitment_id_hash=recruitment_id_hash(participant.recruitment_id)
        ).first()
        said = f" (the worker's error: {row.generation_error})" if row and row.generation_error else ""
        raise DemoSiteFailed(f"check failed: {exc}{said}") from None
    except Exception as exc:  # anything else the site answered wrongly: say so, not as a traceback
        raise DemoSiteFailed(f"check failed: {type(exc).__name__}: {exc}") from None
    _report_responses(walk.recruitment_id, say)
    say(f"  completion code: {walk.code}")
    say(f"  from the last pick to responses ready: {walk.ready_since_sent_s:.1f} s")
    say("Check passed.")
