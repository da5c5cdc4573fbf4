"""Setting up the site bench: its own database, the question pool's dataset and a tiny model, the two
studies (seeded through the project's services), the Celery workers, and reading back what the workers
did from their logs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

COMPLETION_CODE = "BENCH-DONE"
REPO = Path(__file__).resolve().parents[1]


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
    """`count` Celery workers as a one-GPU host runs one (studyapp.demo_site.worker_start), each with a
    name and a log of its own."""
    from studyapp.demo_site import worker_start

    return [worker_start(log_dir, name=f"worker {i}", hostname=f"bench{i}") for i in range(count)]


TASK_DONE = re.compile(
    r"Task worker\.tasks\.personalize\[[^\]]+\] succeeded in ([\d.]+)s: .*'participant_id': (\d+)"
    r".*'skipped': (True|False)(?:, 'batched': (\d+))?"
)


@dataclass(frozen=True)
class TaskRun:
    worker: int
    participant_id: int
    seconds: float
    skipped: bool  # nothing to do: the participant's responses were stored, or are in another's batch
    first: bool  # the worker's first task, which loads the model
    batched: int = 0  # the other participants it generated in its batch (their own tasks skip)


def personalize_runs(workers: list[Any]) -> list[TaskRun]:
    """Every personalize task the workers finished, from their logs."""
    runs = []
    for i, worker in enumerate(workers):
        for n, match in enumerate(TASK_DONE.finditer(worker.log.read_text(errors="replace"))):
            batched = int(match[4] or 0)
            runs.append(TaskRun(i, int(match[2]), float(match[1]), match[3] == "True", n == 0, batched))
    return runs


# The web server under test and the workers' core

SERVERS = ("daphne", "production")
PRODUCTION_LISTENING = re.compile(r"Listening at: http://([\d.]+:\d+)")
PRODUCTION_WORKER_UP = re.compile(r"Application startup complete\.")


def static_collect(static_root: Path) -> None:
    """The static files gathered (hashed, compressed) into `static_root`, as `./run serve` does first."""
    argv = [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"]
    env = {**os.environ, "STATIC_ROOT": str(static_root), "STATIC_COLLECTED": "true"}
    subprocess.run(argv, cwd=REPO, env=env, check=True)


def server_start(kind: str, log_dir: Path, *, web_workers: int, static_root: Path, timeout_s: float) -> Any:
    """The web server `kind` on a free loopback port, once it answers: "daphne", one process as the demo
    site serves it (studyapp.demo_site.server_start), or "production", `python -m studyapp.serving` as
    `./run serve` starts it (gunicorn, `web_workers` uvicorn worker processes, the static files collected
    into `static_root` by `static_collect`), once every worker is up. Returns the server (a
    studyapp.demo_site.Child, stopped with its `stop`) and its URL."""
    from studyapp import demo_site

    if kind == "daphne":
        server = demo_site.server_start(log_dir, host="127.0.0.1", port=0)
        return server, f"http://{server.wait_for(demo_site.SERVER_LISTENING, timeout_s)[1]}"
    env = {**os.environ, "WEB_BIND": "127.0.0.1:0", "WEB_WORKERS": str(web_workers)}
    env |= {"STATIC_ROOT": str(static_root), "STATIC_COLLECTED": "true"}
    log = log_dir / "server-production.log"
    with log.open("wb") as out:  # a process group of its own, as demo_site starts its children
        proc = subprocess.Popen(
            [sys.executable, "-m", "studyapp.serving"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    server = demo_site.Child("production server", proc, log)
    url = f"http://{server.wait_for(PRODUCTION_LISTENING, timeout_s)[1]}"
    deadline = time.monotonic() + timeout_s
    while len(PRODUCTION_WORKER_UP.findall(log.read_text(errors="replace"))) < web_workers:
        if time.monotonic() > deadline or proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"the production server's workers did not start:\n{server.log_tail()}")
        time.sleep(0.1)
    return server, url


def server_pids(server: Any) -> list[int]:
    """The server's processes: daphne's one, or gunicorn's master and its workers."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(c) for c in children.read_text().split())] if children.exists() else [pid]


def generation_core() -> int:
    """The one core the workers are pinned to (a GPU host elsewhere stands behind them): core 1, or the
    last this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    return 1 if 1 in allowed else allowed[-1]


def workers_start_pinned(log_dir: Path, count: int, core: int) -> list[Any]:
    """`workers_start`, every worker process (and each thread it makes) on `core` alone: the affinity is
    set on this thread for the spawn, which the children inherit, and given back."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        return workers_start(log_dir, count)
    finally:
        os.sched_setaffinity(0, saved)
