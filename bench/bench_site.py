"""The study site under load, end to end: simulated participants over real HTTP against daphne, PostgreSQL,
Redis and real Celery workers generating with a real tiny model on the CPU.

    ./run bench site                                   # 20 sequential participants, then 200 at once
    ./run bench site --participants 50 --sequential 5 --out var/bench-site.json
    ./run bench site --participants 0 --eval-questions 4 --max-new-tokens 120   # ready latency only
    ./run bench site --fspo CHECKPOINT_DIR --base CHECKPOINT_DIR           # trained models instead

Two measurements, in one run:

(a) Ready latency: participants one after another, each from the entry link to the completion page;
    timed from the response to their last pick's POST to the status endpoint (the waiting page's
    polling fallback, polled every 50 ms here) saying "ready", and on the database's clock from the
    last pick's `answered_at` to the responses' `created_at`.
(b) Load: `--participants` simulated participants at once, each with its own cookie jar, through the
    whole flow (entry link with PROLIFIC_PID, consent, instructions, every pick, the waiting page
    polling the status endpoint every 3 s as waiting.js does, every A/B rating, the survey, the
    completion page). Each one also replays: a double-click (the same POST twice at once) on the first
    and last pick, the first and last rating and the survey, and a stale POST of their first pick and
    first rating (the other side, from the old form) once they have moved on. Every request is counted
    and timed; an error is a 5xx, a connection error, any 4xx (the flow never expects one) or a page
    other than the one the journey should reach.

At the end the database is counted: picks, ratings, responses and surveys must equal exactly
participants x their number each, the judgments the site acknowledged (answered a POST of with the next
step) must all be there and no more, and every stored judgment must be the one the participant sent first
(so no replay was recorded or changed a judgment). The run fails (exit 1) if not, or on any error.

What it starts: a PostgreSQL database of its own (`--database-url`, created at the start and dropped at
the end; its name must contain "bench"), a Redis database of its own (`--redis-url`, flushed), migrations,
two studies seeded through the project's services with a question pool from a procedural ELIX dataset,
`--workers` Celery workers as a GPU host runs one (queues gpu,cpu, solo pool, concurrency 1, prefetch 1;
`--torch-threads` each), and one daphne process serving `studyapp.asgi_static:application` on a free
loopback port, with DEBUG off. daphne, not uvicorn: it is what the project serves with (`manage.py
runserver`, the demo site, the browser tests) and it speaks WebSocket, which the waiting page uses first;
this environment's uvicorn has no WebSocket library. The model is a random Llama of the demo's shape (4
layers, hidden 128) with a BPE tokenizer trained on the dataset, built at the start, for both arms (so it
writes exactly `--max-new-tokens` tokens each time); `--fspo`/`--base` take trained checkpoints instead.

The database and Redis come from these options, not from DATABASE_URL and REDIS_URL: the bench drops and
flushes what it is given, which must never be a database someone set up for other work. The site's other
settings (DB_CONN_MAX_AGE, ...) pass from the environment to the server and the workers, as deployed.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import random
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from studyapp.demo_check import attention_check_side, form_field

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/bench_site"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/8"
PAGE_POLL_S = 3.0  # studyapp/static/studyapp/waiting.js: POLL_MS
READY_POLL_S = 0.05  # the sequential measurement polls faster, so it times the worker, not the interval
START_TIMEOUT_S = 120
SIDES = ("left", "right")
COMPLETION_CODE = "BENCH-DONE"


# ---------------------------------------------------------------------------------------------------
# Recording requests


@dataclass
class Sample:
    kind: str  # "POST pick", "GET status", "POST rate (double-click)", ...
    status: int
    seconds: float


@dataclass
class Recorder:
    """Every request of a phase: its kind, status and latency, and every error by category."""

    samples: list[Sample] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first three errors of each category

    def error(self, category: str, message: str) -> None:
        self.errors[category] += 1
        if self.errors[category] <= 3:
            self.examples.append(f"{category}: {message}")


class FlowFailed(Exception):
    """A participant could not go on (the error is already recorded)."""


@dataclass
class Walked:
    """What one simulated participant did."""

    recruitment_id: str
    picks: list[str] = field(default_factory=list)  # the side sent first for each pick, in order
    ratings: list[str] = field(default_factory=list)
    ready_s: float | None = None  # from the last pick's response to the status saying ready
    code: str = ""
    completed: bool = False  # reached the completion page
    finished: bool = False  # completed, or stopped at an error


def _step(path: str) -> str:
    """The step a participant URL is for: /s/<slug>/pick/3/ -> pick; /s/<slug>/ -> entry."""
    match = re.match(r"/s/[^/]+/([a-z]+)/", path)
    return match[1] if match else "entry"


class SimulatedParticipant:
    """One participant's browser: its own cookie jar, the pages' forms with their CSRF tokens, redirects
    followed one by one (each one a request of its own in the record)."""

    def __init__(
        self,
        base_url: str,
        slug: str,
        recruitment_id: str,
        recorder: Recorder,
        *,
        seed: str,
        replays: bool,
        poll_s: float,
        wait_timeout_s: float,
    ) -> None:
        self.root = f"/s/{slug}/"
        self.rec = recorder
        self.rng = random.Random(seed)
        self.replays = replays
        self.poll_s = poll_s
        self.wait_timeout_s = wait_timeout_s
        self.walked = Walked(recruitment_id)
        self.client = httpx.AsyncClient(base_url=base_url, timeout=120)

    async def send(self, kind: str, method: str, url: str, data: dict[str, str] | None = None) -> Any:
        start = time.perf_counter()
        try:
            response = await self.client.request(method, url, data=data)
        except httpx.HTTPError as exc:
            self.rec.error("connection", f"{kind} {url}: {type(exc).__name__}: {exc}")
            raise FlowFailed from None
        self.rec.samples.append(Sample(kind, response.status_code, time.perf_counter() - start))
        if response.status_code >= 500:
            self.rec.error("5xx", f"{kind} {url}: HTTP {response.status_code}")
            raise FlowFailed
        if response.status_code >= 400:
            self.rec.error("unexpected 4xx", f"{kind} {url}: HTTP {response.status_code}")
            raise FlowFailed
        return response

    async def follow(self, response: Any) -> Any:
        while response.is_redirect:
            location = response.headers["location"]
            response = await self.send(f"GET {_step(location)}", "GET", location)
        return response

    def expect(self, response: Any, step: str, number: int | None = None) -> None:
        want = f"{self.root}{step}/" + (f"{number}/" if number is not None else "")
        if response.status_code != 200 or response.url.path != want:
            self.rec.error("flow", f"{self.walked.recruitment_id}: expected {want}, got {response.url.path}")
            raise FlowFailed

    async def post(self, kind: str, page: Any, data: dict[str, str]) -> Any:
        """POST the page's form to the page's own address, not following the redirect."""
        token = form_field(page.text, "csrfmiddlewaretoken")
        return await self.send(kind, "POST", page.url.path, {"csrfmiddlewaretoken": token, **data})

    async def submit(
        self, name: str, page: Any, data: dict[str, str], *, double: bool, record: list[str] | None = None
    ) -> Any:
        """Submit a form; with `double`, twice at once (a double-click), and both must be redirected to
        the same page. `record` gets the choice once the site has acknowledged it (answered a POST of it
        with a redirect), even if the other POST then failed. Returns the first POST's response."""
        posts = [self.post(f"POST {name}", page, data)]
        if double:
            posts.append(self.post(f"POST {name} (double-click)", page, data))
        # Both run to the end before either's error is raised: the client must not close under the other.
        outcomes = await asyncio.gather(*posts, return_exceptions=True)
        answered = [o for o in outcomes if not isinstance(o, BaseException)]
        if record is not None and any(o.is_redirect for o in answered):
            record.append(data["choice"])
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        first = outcomes[0]
        if not first.is_redirect:
            self.rec.error("flow", f"{self.walked.recruitment_id}: POST {name} was answered with its form")
            raise FlowFailed
        if double:
            self.expect_redirect(outcomes[1], f"{name} double-click", first.headers["location"])
        return first

    def expect_redirect(self, response: Any, what: str, location: str) -> None:
        if not response.is_redirect or response.headers["location"] != location:
            got = response.headers.get("location", f"HTTP {response.status_code}")
            self.rec.error("flow", f"{self.walked.recruitment_id}: {what} went to {got}, not {location}")
            raise FlowFailed

    async def stale(self, name: str, page: Any, data: dict[str, str], now_at: Any) -> None:
        """Re-POST an earlier page's form (its old item, the other side): it must only be redirected to
        the participant's current step, which `now_at` (the previous submit's response) names."""
        response = await self.post(f"POST {name} (stale)", page, data)
        self.expect_redirect(response, f"stale {name}", now_at.headers.get("location", ""))

    async def walk(self) -> Walked:
        try:
            await self._walk()
            self.walked.completed = True
        except FlowFailed:
            pass
        except Exception as exc:  # a page without its form, a parse error: the site answered wrongly
            self.rec.error("flow", f"{self.walked.recruitment_id}: {type(exc).__name__}: {exc}")
        finally:
            await self.client.aclose()
        self.walked.finished = True  # not when cancelled: the phase's timeout counts those
        return self.walked

    async def _walk(self) -> None:
        w, rng = self.walked, self.rng
        query = f"?PROLIFIC_PID={w.recruitment_id}&STUDY_ID=bench&SESSION_ID=s-{w.recruitment_id}"
        r = await self.follow(await self.send("GET entry", "GET", self.root + query))
        self.expect(r, "consent")
        r = await self.follow(await self.post("POST consent", r, {"decision": "agree"}))
        self.expect(r, "instructions")
        r = await self.follow(await self.post("POST instructions", r, {}))

        first_page, n = None, 0
        last_pick_at = 0.0
        while _step(r.url.path) == "pick":
            n += 1
            self.expect(r, "pick", n)
            choice = rng.choice(SIDES)
            data = {"item": form_field(r.text, "item"), "choice": choice}
            page, first_page = r, first_page or r
            last = f"Question {n} of {n}<" in r.text
            double = self.replays and (n == 1 or last)
            r = await self.submit("pick", page, data, double=double, record=w.picks)
            last_pick_at = time.perf_counter()
            if self.replays and n == 2:
                old = {"item": form_field(first_page.text, "item"), "choice": _other(w.picks[0])}
                await self.stale("pick", first_page, old, now_at=r)
            r = await self.follow(r)
        if not w.picks:
            self.expect(r, "pick", 1)

        if _step(r.url.path) == "waiting":
            await self._wait_until_ready(last_pick_at)
            r = await self.follow(await self.send("GET waiting", "GET", f"{self.root}waiting/"))
        else:  # the responses were ready before the redirect to the waiting page was followed
            w.ready_s = time.perf_counter() - last_pick_at

        first_page, n = None, 0
        while _step(r.url.path) == "rate":
            n += 1
            self.expect(r, "rate", n)
            choice = attention_check_side(r.text) or rng.choice(SIDES)
            data = {
                "item": form_field(r.text, "item"),
                "choice": choice,
                "strength": str(rng.randint(1, 5)),
                "reason": "Simulated.",
            }
            page, first_page = r, first_page or r
            last = f"Comparison {n} of {n}<" in r.text
            double = self.replays and (n == 1 or last)
            r = await self.submit("rate", page, data, double=double, record=w.ratings)
            if self.replays and n == 2:
                old = {**data, "item": form_field(first_page.text, "item"), "choice": _other(w.ratings[0])}
                await self.stale("rate", first_page, old, now_at=r)
            r = await self.follow(r)
        self.expect(r, "survey")
        data = {"self_description": "A simulated participant.", "comments": ""}
        r = await self.follow(await self.submit("survey", r, data, double=self.replays))
        self.expect(r, "done")
        code = re.search(r"<output[^>]*>(.*?)</output>", r.text, re.DOTALL)
        w.code = html.unescape(code[1]).strip() if code else ""
        if w.code != COMPLETION_CODE:  # e.g. an attention check answered wrongly
            self.rec.error("flow", f"{w.recruitment_id}: the completion page shows {w.code!r}")
            raise FlowFailed

    async def _wait_until_ready(self, since: float) -> None:
        deadline = since + self.wait_timeout_s
        while time.perf_counter() < deadline:
            status = (await self.send("GET status", "GET", f"{self.root}status/")).json()
            if status.get("generation") == "failed":
                self.rec.error("flow", f"{self.walked.recruitment_id}: generation failed")
                raise FlowFailed
            if status.get("generation") == "ready" or status.get("state") != "waiting":
                self.walked.ready_s = time.perf_counter() - since
                return
            await asyncio.sleep(self.poll_s)
        self.rec.error("flow", f"{self.walked.recruitment_id}: not ready within {self.wait_timeout_s:.0f} s")
        raise FlowFailed


def _other(side: str) -> str:
    return "right" if side == "left" else "left"


async def run_participants(
    make: Callable[[int], SimulatedParticipant],
    count: int,
    walked: list[Walked],
    *,
    concurrent: bool,
    label: str,
) -> None:
    """Walk `count` participants (all at once, or one after another) under a progress bar. Each one's
    record goes into `walked` as it starts, and fills in as it goes (so a timeout leaves what was done)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[info]}")) as progress:
        bar = progress.add_task(label, total=count, info="")

        async def one(i: int) -> None:
            participant = make(i)
            walked.append(participant.walked)
            await participant.walk()
            rec = participant.rec
            info = f"{len(rec.samples):,} requests, {sum(rec.errors.values())} errors"
            progress.update(bar, advance=1, info=info)

        if concurrent:
            await asyncio.gather(*(one(i) for i in range(count)))
        else:
            for i in range(count):
                await one(i)


# ---------------------------------------------------------------------------------------------------
# Setting up: database, Redis, the model, the studies, the processes


def database_drop(url: str, *, create: bool = False) -> None:
    """Drop the database `url` names (its connections closed first), and with `create` make it afresh."""
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    admin = urlsplit(url)._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            conn.execute(f'CREATE DATABASE "{name}"')


def build_pool_and_model(tmp: Path, *, build_model: bool) -> tuple[Path, Path | None]:
    """A procedural ELIX dataset (the question pool's source) and, with `build_model`, a random tiny
    Llama of the demo's shape with a BPE tokenizer trained on the dataset's text."""
    from modeling.data import EpisodeSource
    from modeling.synth import generate_dataset

    dataset = tmp / "elix"
    generate_dataset(out_dir=dataset, domain="elix", users=60, pairs_per_user=20, seed=0)
    if not build_model:
        return dataset, None
    from transformers.utils import logging as hf_logging

    from modeling.tinymodel import build_tiny_causal_lm, train_tokenizer

    hf_logging.disable_progress_bar()

    source = EpisodeSource(dataset, split="train")
    tokenizer = train_tokenizer(
        list(source.responses) + list(source.questions.text), tmp / "tokenizer", vocab_size=1024
    )
    model = build_tiny_causal_lm(
        tmp / "model",
        tokenizer,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        intermediate_size=384,
        max_position_embeddings=4096,
    )
    return dataset, model


@dataclass(frozen=True)
class StudySettings:
    picks: int
    eval_questions: int
    max_new_tokens: int
    consistency_repeats: int = 1
    attention_checks: int = 1

    @property
    def ratings(self) -> int:
        """A/B items per participant: one comparison (FSPO vs base) per question, the repeats, the
        attention checks."""
        return (
            self.eval_questions + min(self.consistency_repeats, self.eval_questions) + self.attention_checks
        )


def study_seed(slug: str, settings: StudySettings, *, dataset: Path, fspo: Path, base: Path) -> Any:
    """An open study with its pool, arms FSPO (the picks as shots) and base (no context), FSPO vs base,
    made through the studio's service."""
    from annotation.pool import pool_from_dataset
    from studyapp.models import Arm
    from studyapp.services import ArmSpec, study_create

    pool = pool_from_dataset(dataset, elicitation=settings.picks + 4, evaluation=settings.eval_questions + 4)
    fields = {
        "title": f"Bench ({slug})",
        "slug": slug,
        "n_pairs": settings.picks,
        "n_eval_questions": settings.eval_questions,
        "consistency_repeats": settings.consistency_repeats,
        "attention_checks": settings.attention_checks,
        "attention_failures_allowed": 0,
        "quota": 100_000,
        "consent_text": "A benchmark run.",
        "completion_code": COMPLETION_CODE,
        "screened_out_code": "BENCH-FULL",
        "failed_attention_code": "BENCH-ATTN",
        "declined_code": "BENCH-DECLINED",
        "max_new_tokens": settings.max_new_tokens,
        "is_open": True,
    }
    arms = [
        ArmSpec("FSPO", Arm.Method.FSPO, str(fspo.resolve())),
        ArmSpec("base", Arm.Method.NO_CONTEXT, str(base.resolve())),
    ]
    return study_create(fields=fields, arms=arms, comparisons=[("FSPO", "base")], pool=pool)


def workers_start(log_dir: Path, count: int) -> list[Any]:
    """`count` Celery workers as a one-GPU host runs one (studyapp.demo_site.worker_start's options),
    each with a name of its own."""
    from studyapp.demo_site import Child

    children = []
    for i in range(count):
        argv = [sys.executable, "-m", "celery", "-A", "studyapp", "worker", "--queues", "gpu,cpu"]
        argv += ["--concurrency", "1", "--pool", "solo", "--prefetch-multiplier", "1"]
        argv += ["--loglevel", "info", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        argv += ["--hostname", f"bench{i}-{os.getpid()}@%h"]
        log = log_dir / f"worker{i}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, process_group=0)
        children.append(Child(f"worker {i}", proc, log))
    return children


TASK_DONE = re.compile(
    r"Task worker\.tasks\.personalize\[[^\]]+\] succeeded in ([\d.]+)s: .*'participant_id': (\d+)"
    r".*'skipped': (True|False)"
)


@dataclass(frozen=True)
class TaskRun:
    worker: int
    participant_id: int
    seconds: float
    skipped: bool  # nothing to do: the participant's responses were already stored
    first: bool  # the worker's first task, which loads the model


def personalize_runs(workers: list[Any]) -> list[TaskRun]:
    """Every personalize task the workers finished, from their logs."""
    runs = []
    for i, worker in enumerate(workers):
        for n, match in enumerate(TASK_DONE.finditer(worker.log.read_text(errors="replace"))):
            runs.append(TaskRun(i, int(match[2]), float(match[1]), match[3] == "True", n == 0))
    return runs


# ---------------------------------------------------------------------------------------------------
# Counting


EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception): .*)$", re.MULTILINE)


def server_exceptions(log: Path) -> dict[str, int]:
    """The exceptions the server's log reports (the last line of each traceback), most frequent first."""
    lines = EXCEPTION_LINE.findall(log.read_text(errors="replace"))
    return dict(Counter(re.sub(r"port \d+", "port N", line)[:200] for line in lines).most_common(5))


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def latency_table(rec: Recorder) -> list[dict[str, Any]]:
    """Latency by request kind (and over all requests), in milliseconds."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    for sample in rec.samples:
        by_kind[sample.kind].append(sample.seconds)
    kinds = sorted(by_kind, key=lambda k: (_step_order(k), k))
    by_kind["all requests"] = [sample.seconds for sample in rec.samples]
    return [
        {
            "kind": kind,
            "count": len(values),
            **{f"p{q}_ms": 1000 * percentile(values, q) for q in (50, 95, 99)},
            "max_ms": 1000 * max(values, default=float("nan")),
        }
        for kind in ["all requests", *kinds]
        for values in [by_kind[kind]]
    ]


def _step_order(kind: str) -> int:
    steps = ["entry", "consent", "instructions", "pick", "waiting", "status", "rate", "survey", "done"]
    name = kind.split()[1]
    return steps.index(name) if name in steps else len(steps)


def database_check(study: Any, walked: list[Walked], settings: StudySettings) -> dict[str, Any]:
    """Count the study's rows against what its participants should have stored (participants x their
    number each) and against what the site acknowledged (a judgment counts once its POST was answered
    with the next step); every stored judgment must be the one its participant sent first."""
    from annotation.models import ElicitationPick, GeneratedResponse, Rating, SurveyResponse
    from studyapp.models import Participant
    from studyapp.services import recruitment_id_hash

    n, arms = len(walked), study.arms.count()
    in_study = {"participant__study": study}
    found = {
        "participants completed": Participant.objects.filter(
            study=study, state=Participant.State.COMPLETED
        ).count(),
        "elicitation picks": ElicitationPick.objects.filter(item__participant__study=study).count(),
        "generated responses": GeneratedResponse.objects.filter(**in_study).count(),
        "ratings": Rating.objects.filter(item__participant__study=study).count(),
        "surveys": SurveyResponse.objects.filter(**in_study).count(),
    }
    expected = {
        "participants completed": n,
        "elicitation picks": n * settings.picks,
        "generated responses": n * arms * settings.eval_questions,
        "ratings": n * settings.ratings,
        "surveys": n,
    }
    acknowledged = {
        "participants completed": sum(w.completed for w in walked),
        "elicitation picks": sum(len(w.picks) for w in walked),
        "generated responses": sum(w.ready_s is not None for w in walked) * arms * settings.eval_questions,
        "ratings": sum(len(w.ratings) for w in walked),
        "surveys": sum(w.completed for w in walked),
    }
    changed = 0
    for w in walked:
        id_hash = recruitment_id_hash(w.recruitment_id)
        p = Participant.objects.filter(study=study, recruitment_id_hash=id_hash).first()
        if p is None:  # never enrolled: the errors say why
            continue
        picks = ElicitationPick.objects.filter(item__participant=p).order_by("item__position")
        ratings = Rating.objects.filter(item__participant=p).order_by("item__position")
        # What was stored must start with what was acknowledged, in order (a POST that failed may
        # still have been stored after the last acknowledged one).
        changed += [x.choice for x in picks][: len(w.picks)] != w.picks
        changed += [x.choice for x in ratings][: len(w.ratings)] != w.ratings
    key = "participants with a judgment other than the one sent first"
    expected[key] = acknowledged[key] = 0
    found[key] = changed
    return {
        "expected": expected,
        "acknowledged": acknowledged,
        "found": found,
        "ok": found == expected == acknowledged,
    }


def ready_on_database_clock(walked: list[Walked]) -> list[float]:
    """Per participant, on the database's clock: from their last pick's `answered_at` to their
    responses' `created_at` (set as they are stored, in the transaction that makes them ready)."""
    from django.db.models import Max

    from studyapp.models import Participant
    from studyapp.services import recruitment_id_hash

    hashes = [recruitment_id_hash(w.recruitment_id) for w in walked]
    rows = Participant.objects.filter(recruitment_id_hash__in=hashes).annotate(
        last_pick=Max("elicitation_items__pick__answered_at"), ready=Max("responses__created_at")
    )
    return [(p.ready - p.last_pick).total_seconds() for p in rows if p.ready and p.last_pick]


# ---------------------------------------------------------------------------------------------------
# The run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--participants", type=int, default=200, help="at once, in the load test (0: none)")
    parser.add_argument("--sequential", type=int, default=20, help="one after another, for ready latency")
    parser.add_argument("--picks", type=int, default=4, help="pairwise picks per participant (N shots)")
    parser.add_argument("--eval-questions", type=int, default=2, help="evaluation questions per participant")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--torch-threads", type=int, default=1, help="per worker (OMP_NUM_THREADS)")
    parser.add_argument(
        "--poll-interval", type=float, default=PAGE_POLL_S, help="the load test's status polls (s)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="bound on each phase, in seconds")
    parser.add_argument("--fspo", type=Path, help="the FSPO arm's checkpoint (default: a built random one)")
    parser.add_argument("--base", type=Path, help="the base arm's checkpoint (default: the FSPO arm's)")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--keep-db", action="store_true", help="leave the bench database behind")
    parser.add_argument("--log-dir", type=Path, help="keep the server's and workers' logs here")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if "bench" not in urlsplit(args.database_url).path:
        parser.error("--database-url: the bench drops this database, so its name must contain 'bench'")

    command = ("./run bench site " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    print(f"$ {command}")
    print(f"machine: {os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.2f}")
    settings = StudySettings(args.picks, args.eval_questions, args.max_new_tokens)

    # The bench, its server and its workers all run on the bench's own database and Redis database;
    # any other setting of the site (DB_CONN_MAX_AGE, ...) comes from the environment, as deployed.
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DJANGO_ALLOW_ASYNC_UNSAFE"):
        os.environ.pop(name, None)
    os.environ.update(
        DJANGO_SETTINGS_MODULE="studyapp.settings",
        DATABASE_URL=args.database_url,
        REDIS_URL=args.redis_url,
        DEBUG="false",
        SECRET_KEY=secrets.token_urlsafe(32),
        PARTICIPANT_ID_KEY="bench-participant-id-key",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    with tempfile.TemporaryDirectory(prefix="bench-site-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        dataset, model = build_pool_and_model(tmp, build_model=args.fspo is None)
        fspo = args.fspo or model
        base = args.base or fspo
        built = "the question pool's dataset" + (" and the model" if model else "")
        print(f"built {built} in {time.perf_counter() - start:.1f} s")
        # Set after torch has loaded here: it is for the workers, which start below.
        os.environ.update(OMP_NUM_THREADS=str(args.torch_threads), MKL_NUM_THREADS=str(args.torch_threads))
        database_drop(args.database_url, create=True)
        try:
            summary = run(args, settings, args.log_dir or tmp, dataset, fspo, base)
        finally:
            if not args.keep_db:
                database_drop(args.database_url)
    summary = {"command": command, **summary}
    print_report(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
        print(f"results written to {args.out}")
    return 0 if summary["ok"] else 1


def run(
    args: argparse.Namespace, settings: StudySettings, log_dir: Path, dataset: Path, fspo: Path, base: Path
) -> dict[str, Any]:
    """Set up the site, measure, stop it, and count; the summary of it all."""
    import django
    import redis

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from studyapp.demo_site import SERVER_LISTENING, WORKER_READY, server_start

    redis.Redis.from_url(args.redis_url).flushdb()
    call_command("migrate", interactive=False, verbosity=0)
    seq_study = study_seed("bench-ready", settings, dataset=dataset, fspo=fspo, base=base)
    load_study = study_seed("bench-load", settings, dataset=dataset, fspo=fspo, base=base)
    connection.close()  # the bench's own queries come back only after the run

    log_dir.mkdir(parents=True, exist_ok=True)
    workers = workers_start(log_dir, args.workers)
    server = server_start(log_dir, host="127.0.0.1", port=0)
    setup = {
        "server": "daphne (1 process) serving studyapp.asgi_static:application, DEBUG off",
        "database": f"PostgreSQL {args.database_url.rsplit('@', 1)[-1]}",
        "broker and channel layer": f"Redis {args.redis_url.rsplit('@', 1)[-1]}",
        "workers": f"{args.workers} x celery worker --queues gpu,cpu --pool solo --concurrency 1 "
        f"--prefetch-multiplier 1, torch threads {args.torch_threads}",
        "model": "random Llama, 4 layers, hidden 128, BPE vocab 1024 (built), both arms"
        if args.fspo is None
        else f"FSPO {fspo}, base {base}",
        "study": f"{settings.picks} picks, {settings.eval_questions} evaluation questions x 2 arms "
        f"(FSPO, base), {settings.ratings} A/B ratings (1 repeat, 1 attention check), "
        f"max_new_tokens {settings.max_new_tokens}, greedy",
        "site settings from the environment": ", ".join(
            f"{k}={os.environ[k]}" for k in SITE_KNOBS if k in os.environ
        )
        or "none (the defaults)",
    }
    try:
        url = f"http://{server.wait_for(SERVER_LISTENING, START_TIMEOUT_S)[1]}"
        for worker in workers:
            worker.wait_for(WORKER_READY, START_TIMEOUT_S)
        print(f"site at {url}")
        for key, value in setup.items():
            print(f"  {key:<34} {value}")
        pids = {"server (daphne)": server.proc.pid}
        pids |= {f"worker {i}": worker.proc.pid for i, worker in enumerate(workers)}
        phases = asyncio.run(measure(args, url, seq_study.slug, load_study.slug, pids))
    finally:
        for child in [server, *workers]:  # the server first: no new work reaches the workers
            child.stop()
    summary = summarize(args, setup, settings, phases, seq_study, load_study, personalize_runs(workers))
    summary["load"]["server_log_exceptions"] = server_exceptions(server.log)
    return summary


# Settings of the site that change how it behaves under load; the report says which were set.
SITE_KNOBS = ("DB_CONN_MAX_AGE", "DB_POOL_MAX_SIZE", "CELERY_VISIBILITY_TIMEOUT")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) used so far by each process, and by this one (the simulated browsers)."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in pids.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    own = os.times()
    return used | {"simulated participants (this process)": own.user + own.system}


async def measure(
    args: argparse.Namespace, url: str, seq_slug: str, load_slug: str, pids: dict[str, int]
) -> dict[str, Any]:
    """The three phases: warm-up (every worker loads the model), sequential, load."""
    run_id = secrets.token_hex(3)
    phases: dict[str, Any] = {}

    async def phase(name: str, slug: str, count: int, *, concurrent: bool, **options: Any) -> None:
        rec, walked = Recorder(), []

        def make(i: int) -> SimulatedParticipant:
            rid = f"bench-{run_id}-{name.replace(' ', '-')}-{i:04d}"
            return SimulatedParticipant(url, slug, rid, rec, seed=f"{name}:{i}", **options)

        work = run_participants(make, count, walked, concurrent=concurrent, label=f"{name:<12}")
        start, cpu_before = time.perf_counter(), cpu_seconds(pids)
        try:
            await asyncio.wait_for(work, timeout=args.timeout)
        except TimeoutError:
            for _ in range(count - sum(w.finished for w in walked)):
                rec.error("timeout", f"{name}: not done within --timeout {args.timeout:.0f} s")
        cpu = {k: v - cpu_before[k] for k, v in cpu_seconds(pids).items()}
        seconds = time.perf_counter() - start
        phases[name] = {"walked": walked, "seconds": seconds, "recorder": rec, "cpu_s": cpu}

    quick = {"replays": False, "poll_s": READY_POLL_S, "wait_timeout_s": args.timeout}
    # Every worker loads the model with its first task: one participant per worker first, not timed.
    await phase("warm-up", seq_slug, args.workers, concurrent=True, **quick)
    await phase("sequential", seq_slug, args.sequential, concurrent=False, **quick)
    page_like = {"replays": True, "poll_s": args.poll_interval, "wait_timeout_s": args.timeout}
    await phase("load test", load_slug, args.participants, concurrent=True, **page_like)
    return phases


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "min": min(values, default=float("nan")),
        "max": max(values, default=float("nan")),
    }


def summarize(
    args: argparse.Namespace,
    setup: dict[str, str],
    settings: StudySettings,
    phases: dict[str, Any],
    seq_study: Any,
    load_study: Any,
    runs: list[TaskRun],
) -> dict[str, Any]:
    """Everything measured, as JSON-ready data (what --out writes and the report prints)."""
    from studyapp.models import Participant

    warm, seq, load = phases["warm-up"], phases["sequential"], phases["load test"]
    rec: Recorder = load["recorder"]
    load_ids = set(Participant.objects.filter(study=load_study).values_list("id", flat=True))
    timed = [r for r in runs if not (r.skipped or r.first)]
    checks = {
        "sequential (incl. warm-up)": database_check(seq_study, warm["walked"] + seq["walked"], settings),
        "load test": database_check(load_study, load["walked"], settings),
    }
    other_errors = sum(warm["recorder"].errors.values()) + sum(seq["recorder"].errors.values())
    errors = sum(rec.errors.values())
    return {
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()[0]},
        "setup": setup,
        "settings": asdict(settings) | {"ratings": settings.ratings, "workers": args.workers},
        "ready_latency_s": {
            "participants": len(seq["walked"]),
            f"status endpoint (polled every {READY_POLL_S * 1000:.0f} ms)": _stats(
                [w.ready_s for w in seq["walked"] if w.ready_s is not None]
            ),
            "database clock (last pick `answered_at` -> responses `created_at`)": _stats(
                ready_on_database_clock(seq["walked"])
            ),
            "errors": other_errors,
        },
        "load": {
            "participants": args.participants,
            "completed": sum(w.completed for w in load["walked"]),
            "seconds": load["seconds"],
            "requests": len(rec.samples),
            "requests_per_s": len(rec.samples) / load["seconds"] if rec.samples else 0.0,
            "errors": errors,
            "errors_by_category": dict(rec.errors),
            "error_examples": rec.examples,
            "latency_ms": latency_table(rec),
            "status_poll_interval_s": args.poll_interval,
            "ready_on_database_clock_s": _stats(ready_on_database_clock(load["walked"])),
            "cpu_s": load["cpu_s"],
        },
        "personalize_tasks_s": {
            "finished": len(runs),
            "skipped_as_already_done": sum(r.skipped for r in runs),
            "per_worker": dict(Counter(f"worker {r.worker}" for r in runs)),
            "first_per_worker_incl_model_load": [r.seconds for r in runs if r.first],
            "sequential": _stats([r.seconds for r in timed if r.participant_id not in load_ids]),
            "load test": _stats([r.seconds for r in timed if r.participant_id in load_ids]),
        },
        "database": checks,
        "ok": errors == 0 and other_errors == 0 and all(c["ok"] for c in checks.values()),
    }


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:,.0f}"


def _print_load(load: dict[str, Any]) -> None:
    print(
        f"(b) load test: {load['participants']} participants at once, {load['completed']} completed in "
        f"{load['seconds']:.1f} s; {load['requests']:,} requests, {load['requests_per_s']:.1f} req/s, "
        f"{load['errors']} errors"
    )
    print()
    print("| requests | count | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in load["latency_ms"]:
        cells = " | ".join(f"{row[k]:,.0f}" for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))
        print(f"| {row['kind']} | {row['count']:,} | {cells} |")
    print()
    print(
        f"errors: {load['errors_by_category'] or 'none'} (5xx, connection errors, any 4xx, wrong page, timeout)"
    )
    for example in load["error_examples"]:
        print(f"  {example}")
    for line, count in load["server_log_exceptions"].items():
        print(f"  the server's log: {count} x {line}")
    r = load["ready_on_database_clock_s"]
    print(
        f"ready under load (database clock): p50 {r['p50']:.1f} s, p95 {r['p95']:.1f} s, max {r['max']:.1f} s "
        f"(status polled every {load['status_poll_interval_s']:g} s, as the page does)"
    )
    cpu = ", ".join(f"{k} {v:.0f} s" for k, v in load["cpu_s"].items())
    print(f"CPU time during the load test ({load['seconds']:.0f} s wall): {cpu}")


def print_report(summary: dict[str, Any]) -> None:
    ready, load, tasks = summary["ready_latency_s"], summary["load"], summary["personalize_tasks_s"]
    print()
    print(
        f"(a) from the last pick's response to responses ready: {ready['participants']} participants one "
        f"after another ({ready['errors']} errors)"
    )
    print()
    print("| measured by | n | p50 (ms) | p95 (ms) | min (ms) | max (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, s in ready.items():
        if isinstance(s, dict):
            cells = " | ".join(_ms(s[k]) for k in ("p50", "p95", "min", "max"))
            print(f"| {label} | {s['n']} | {cells} |")
    print()
    if load["participants"]:
        _print_load(load)
    else:
        print("(b) load test: none (--participants 0)")
    first = ", ".join(f"{s:.1f} s" for s in tasks["first_per_worker_incl_model_load"])
    print(
        f"personalize tasks (worker logs): {tasks['finished']} finished, "
        f"{tasks['skipped_as_already_done']} skipped as already done; each worker's first (loads the "
        f"model) {first}; then p50/p95 {tasks['sequential']['p50']:.2f}/{tasks['sequential']['p95']:.2f} s "
        f"sequential, {tasks['load test']['p50']:.2f}/{tasks['load test']['p95']:.2f} s under load"
    )
    print()
    print("| database rows | expected | acknowledged by the site | found |")
    print("|---|---:|---:|---:|")
    for phase, check in summary["database"].items():
        for key, want in check["expected"].items():
            print(f"| {phase}: {key} | {want:,} | {check['acknowledged'][key]:,} | {check['found'][key]:,} |")
    print()
    print(f"load average at the end: {summary['machine']['load_average_at_end']:.2f}")
    print("PASS: no error, every judgment stored once" if summary["ok"] else "FAIL: see the errors above")


if __name__ == "__main__":
    sys.exit(main())
