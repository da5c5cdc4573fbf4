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
`--torch-threads` each), and one daphne process serving `studyapp.asgi:application` on a free
loopback port, with DEBUG off: one process, as the demo site and the browser tests serve (a real study
runs `./run serve`, gunicorn with several uvicorn worker processes; this bench does not measure it). The model is a random Llama of the demo's shape (4
layers, hidden 128) with a BPE tokenizer trained on the dataset, built at the start, for both arms (so it
writes exactly `--max-new-tokens` tokens each time); `--fspo`/`--base` take trained checkpoints instead.

The database and Redis come from these options, not from DATABASE_URL and REDIS_URL: the bench drops and
flushes what it is given, which must never be a database someone set up for other work. The site's other
settings (DB_CONN_MAX_AGE, ...) pass from the environment to the server and the workers, as deployed.
"""

# The parts (apart from the docstring above, which --help prints): the participants are
# studyapp.scripted_participant's, the walk `./run demo --check` takes too; site_load.py walks them in
# phases, site_setup.py makes the database, the model, the studies and the workers, site_report.py counts
# and prints; this file reads the options and runs it all.

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from site_load import measure
from site_report import print_report, server_exceptions, summarize
from site_setup import (
    StudySettings,
    build_pool_and_model,
    database_drop,
    personalize_runs,
    study_seed,
    workers_start,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/bench_site"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/8"
PAGE_POLL_S = 3.0  # studyapp/static/studyapp/waiting.js: POLL_MS
START_TIMEOUT_S = 120
# Settings of the site that change how it behaves under load; the report says which were set.
SITE_KNOBS = ("DB_CONN_MAX_AGE", "DB_POOL_MAX_SIZE", "CELERY_VISIBILITY_TIMEOUT")


def parse_args() -> argparse.Namespace:
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
    return args


def main() -> int:
    args = parse_args()
    command = ("./run bench site " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    print(f"$ {command}")
    print(f"machine: {os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.2f}")
    settings = StudySettings(args.picks, args.eval_questions, args.max_new_tokens)
    environment_set(args)
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


def environment_set(args: argparse.Namespace) -> None:
    """The bench, its server and its workers all run on the bench's own database and Redis database;
    any other setting of the site (DB_CONN_MAX_AGE, ...) comes from the environment, as deployed."""
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
    setup = setup_described(args, settings, fspo, base)
    try:
        url = f"http://{server.wait_for(SERVER_LISTENING, START_TIMEOUT_S)[1]}"
        for worker in workers:
            worker.wait_for(WORKER_READY, START_TIMEOUT_S)
        print(f"site at {url}")
        for key, value in setup.items():
            print(f"  {key:<34} {value}")
        pids = {"server (daphne)": server.proc.pid}
        pids |= {f"worker {i}": worker.proc.pid for i, worker in enumerate(workers)}
        phases = asyncio.run(measure(args, url, (seq_study.slug, load_study.slug), pids))
    finally:
        for child in [server, *workers]:  # the server first: no new work reaches the workers
            child.stop()
    summary = summarize(args, setup, settings, phases, (seq_study, load_study), personalize_runs(workers))
    summary["load"]["server_log_exceptions"] = server_exceptions(server.log)
    return summary


def setup_described(
    args: argparse.Namespace, settings: StudySettings, fspo: Path, base: Path
) -> dict[str, str]:
    """What the site runs on, as the report's first table says it."""
    return {
        "server": "daphne (1 process) serving studyapp.asgi:application, DEBUG off",
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


if __name__ == "__main__":
    sys.exit(main())
