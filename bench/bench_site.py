"""The study site under load, end to end: simulated participants over real HTTP against the web server
(daphne, or the production server), PostgreSQL, Redis and real Celery workers generating with a real
tiny model on the CPU.

    ./run bench site                                   # 20 sequential participants, then 200 at once
    ./run bench site --participants 50 --sequential 5 --out var/bench-site.json
    ./run bench site --participants 0 --eval-questions 4 --max-new-tokens 120   # ready latency only
    ./run bench site --fspo CHECKPOINT_DIR --base CHECKPOINT_DIR           # trained models instead
    ./run bench site --mode human --server production  # 200 people arriving over 60 s, reading pages
    ./run bench site --mode stress --servers daphne,production   # rising load until p95 > 500 ms

Three modes (`--mode`); every one ends with the database counted, as below.

burst (the default): two measurements, in one run:

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

human: people's pace. `--participants` (200) arrive at uniform random times over `--arrival-s` (60 s;
    seeded by `--seed`) and each reads every page before sending its form: a log-normal think time,
    median 3 s on the consent page, the instructions and the survey and 4 s on a pick or a rating (two
    responses to read), sigma 0.6 (the 95th percentile 2.7 x the median), capped at 30 s, seeded per
    participant, all times `--think-scale` (1; smaller for tests). They poll the status endpoint every
    `--poll-interval` (3 s) as waiting.js does, and replay as in (b). The Celery workers run on one core
    (a GPU host elsewhere stands behind them); the web server has the rest. Reported: page latency
    p50/p95/p99 by page and over all pages (a page: every request the browser makes, GET or POST,
    redirects included; the status polls are counted apart), errors, last pick -> ready p50/p95, and the
    goal: page p95 < 150 ms, p99 < 400 ms, 0 errors.
stress: capacity. No think time: at each of `--levels` (5, 10, 20, 40, 80, 160) that many participants
    at once for `--level-s` seconds, each starting another as soon as one is done (replaying, polling
    every `--poll-interval`), until the pages' p95 passes 500 ms. The capacity is the requests per second
    at the last level under 500 ms. Each server of `--servers` (daphne,production) in turn, on the same
    database and workers (one core, as above), each on a study of its own. Then the slowest page (highest
    p95 at that level, on the first server) is profiled with pyinstrument (bench/site_profile.py): a few
    participants through the site's views in the bench's own process, on the same database, and the
    report says where its time goes.

Servers (`--server`, or `--servers` for stress): daphne, one process serving `studyapp.asgi:application`
as the demo site and the browser tests serve it; production, `python -m studyapp.serving` as `./run serve`
starts it (gunicorn, `--web-workers` uvicorn worker processes, the static files collected into a
temporary STATIC_ROOT, STATIC_COLLECTED=true). Both on a free loopback port, DEBUG off.

At the end the database is counted: picks, ratings, responses and surveys must equal exactly
participants x their number each, the judgments the site acknowledged (answered a POST of with the next
step) must all be there and no more, and every stored judgment must be the one the participant sent first
(so no replay was recorded or changed a judgment). The run fails (exit 1) if not, or on any error.

What it starts: a PostgreSQL database of its own (`--database-url`, created at the start and dropped at
the end; its name must contain "bench"), a Redis database of its own (`--redis-url`, flushed), migrations,
a study per phase seeded through the project's services with a question pool from a procedural ELIX dataset,
`--workers` Celery workers as a GPU host runs one (queues gpu,cpu, solo pool, concurrency 1, prefetch 1;
`--torch-threads` each; on one core in the human and stress modes), and the web server. The model is a
random Llama of the demo's shape (4 layers, hidden 128) with a BPE tokenizer trained on the dataset,
built at the start, for both arms (so it writes exactly `--max-new-tokens` tokens each time); `--fspo`/`--base` take trained checkpoints instead.

The database and Redis come from these options, not from DATABASE_URL and REDIS_URL: the bench drops and
flushes what it is given, which must never be a database someone set up for other work. The site's other
settings (DB_CONN_MAX_AGE, ...) pass from the environment to the server and the workers, as deployed.
"""

# The parts (apart from the docstring above, which --help prints): the participants are
# studyapp.scripted_participant's, the walk `./run demo --check` takes too; site_load.py walks them in
# phases, site_setup.py makes the database, the model, the studies, the workers and the server,
# site_profile.py profiles a page, site_report.py counts and prints; this file reads the options and
# runs it all.

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
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from site_load import Phase, measure_burst, measure_human, measure_stress
from site_report import database_check, server_exceptions, slowest_page, summarize
from site_setup import (
    SERVERS,
    StudySettings,
    build_pool_and_model,
    database_drop,
    generation_core,
    personalize_runs,
    server_pids,
    server_start,
    static_collect,
    study_seed,
    workers_start,
    workers_start_pinned,
)
from site_tables import print_report

from studyapp.scripted_participant import Walk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/bench_site"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/8"
PAGE_POLL_S = 3.0  # studyapp/static/studyapp/waiting.js: POLL_MS
START_TIMEOUT_S = 120
STRESS_LEVELS = "5,10,20,40,80,160"
PROFILE_SLUG = "bench-profile"
# Settings of the site that change how it behaves under load; the report says which were set.
SITE_KNOBS = ("DB_CONN_MAX_AGE", "DB_POOL_MAX_SIZE", "CELERY_VISIBILITY_TIMEOUT")
Measure = Callable[
    [argparse.Namespace, str, tuple[str, str], dict[str, int]], Coroutine[Any, Any, dict[str, Phase]]
]
# Each mode: how it measures, and its two studies' slugs (the first phase's, the measured one's).
MODES: dict[str, tuple[Measure, tuple[str, str]]] = {
    "burst": (measure_burst, ("bench-ready", "bench-load")),
    "human": (measure_human, ("bench-warm-up", "bench-human")),
    "stress": (measure_stress, ("bench-warm-up", "bench-stress")),
}


def parse_args() -> argparse.Namespace:  # long: one add_argument per option, each with its help
    from studyapp.serving import web_server_from_env

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=MODES, default="burst")
    parser.add_argument(
        "--server",
        "--servers",
        dest="servers",
        default="daphne",
        help=f"the web server, one of {', '.join(SERVERS)}; stress takes several, comma-separated, in turn",
    )
    parser.add_argument(
        "--web-workers",
        type=int,
        default=web_server_from_env().workers,
        help="the production server's worker processes (default: studyapp.serving's for this machine)",
    )
    parser.add_argument(
        "--participants", type=int, default=200, help="burst: at once (0: none); human: arriving"
    )
    parser.add_argument(
        "--sequential", type=int, default=20, help="burst: one after another, for ready latency"
    )
    parser.add_argument("--arrival-s", type=float, default=60, help="human: the arrivals spread over this")
    parser.add_argument("--think-scale", type=float, default=1.0, help="human: think times x this")
    parser.add_argument("--seed", type=int, default=0, help="human: arrivals and think times")
    parser.add_argument(
        "--levels",
        type=lambda text: [int(n) for n in text.split(",")],
        default=STRESS_LEVELS,
        help=f"stress: participants at once, level by level (default {STRESS_LEVELS})",
    )
    parser.add_argument("--level-s", type=float, default=30, help="stress: seconds at each level")
    parser.add_argument(
        "--profile-participants",
        type=int,
        default=5,
        help="stress: walked to profile the slowest page (0: none)",
    )
    parser.add_argument("--picks", type=int, default=4, help="pairwise picks per participant (N shots)")
    parser.add_argument("--eval-questions", type=int, default=2, help="evaluation questions per participant")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--torch-threads", type=int, default=1, help="per worker (OMP_NUM_THREADS)")
    parser.add_argument(
        "--poll-interval", type=float, default=PAGE_POLL_S, help="the status polls but burst's (a) (s)"
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
    args.servers = args.servers.split(",")
    if unknown := set(args.servers) - set(SERVERS):
        parser.error(f"--server: {', '.join(sorted(unknown))} (choose from {', '.join(SERVERS)})")
    if len(args.servers) > 1 and args.mode != "stress":
        parser.error("--servers: several only in --mode stress")
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
        if "production" in args.servers:
            static_collect(tmp / "static")
        # Set after torch has loaded here: it is for the workers, which start below.
        os.environ.update(OMP_NUM_THREADS=str(args.torch_threads), MKL_NUM_THREADS=str(args.torch_threads))
        database_drop(args.database_url, create=True)
        try:
            summary = run(args, settings, args.log_dir or tmp, tmp, dataset, fspo, base)
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
    args: argparse.Namespace,
    settings: StudySettings,
    log_dir: Path,
    tmp: Path,
    dataset: Path,
    fspo: Path,
    base: Path,
) -> dict[str, Any]:
    """Set up the site, measure on each server in turn, stop it, and count; the summary of it all."""
    import django
    import redis

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from studyapp.demo_site import WORKER_READY

    measure, (first_slug, measured_slug) = MODES[args.mode]
    redis.Redis.from_url(args.redis_url).flushdb()
    call_command("migrate", interactive=False, verbosity=0)
    slugs = [first_slug] + [f"{measured_slug}-{kind}" for kind in args.servers]
    slugs += [PROFILE_SLUG] if args.mode == "stress" and args.profile_participants else []
    studies = {slug: study_seed(slug, settings, dataset=dataset, fspo=fspo, base=base) for slug in slugs}
    connection.close()  # the bench's own queries come back only after the run

    log_dir.mkdir(parents=True, exist_ok=True)
    core = None if args.mode == "burst" else generation_core()
    pinned = core is not None
    workers = (
        workers_start_pinned(log_dir, args.workers, core) if pinned else workers_start(log_dir, args.workers)
    )
    setup = setup_described(args, settings, fspo, base, core)
    by_server: dict[str, dict[str, Phase]] = {}
    exceptions: dict[str, dict[str, int]] = {}
    profile: tuple[dict[str, Any], list[Walk]] | None = None
    try:
        for worker in workers:
            worker.wait_for(WORKER_READY, START_TIMEOUT_S)
        print("\n".join(f"  {key:<34} {value}" for key, value in setup.items()))
        for kind in args.servers:
            slugs_of_kind = (first_slug, f"{measured_slug}-{kind}")
            by_server[kind], exceptions[kind] = measure_on(
                kind, args, measure, slugs_of_kind, workers, log_dir, tmp
            )
        if args.mode == "stress" and args.profile_participants:
            profile = profile_slowest(args, by_server[args.servers[0]]["stress"], log_dir)
    finally:
        for worker in workers:
            worker.stop()
    measured = {kind: studies[f"{measured_slug}-{kind}"] for kind in args.servers}
    summary = summarize(
        args, setup, settings, by_server, (studies[first_slug], measured), personalize_runs(workers)
    )
    summary["server_log_exceptions"] = exceptions
    if profile is not None:
        summary["profile"], walked = profile
        summary["database"]["profile"] = check = database_check(studies[PROFILE_SLUG], walked, settings)
        summary["ok"] = summary["ok"] and check["ok"] and not profile[0]["errors"]
    return summary


def measure_on(
    kind: str,
    args: argparse.Namespace,
    measure: Any,
    slugs: tuple[str, str],
    workers: list[Any],
    log_dir: Path,
    tmp: Path,
) -> tuple[dict[str, Phase], dict[str, int]]:
    """Start the `kind` server, measure on it, stop it: the phases measured, and the exceptions its log
    shows."""
    server, url = server_start(
        kind, log_dir, web_workers=args.web_workers, static_root=tmp / "static", timeout_s=START_TIMEOUT_S
    )
    try:
        print(f"{kind} server at {url}")
        pids = {f"server ({kind}) process {i}": pid for i, pid in enumerate(server_pids(server))}
        pids |= {f"worker {i}": worker.proc.pid for i, worker in enumerate(workers)}
        phases = asyncio.run(measure(args, url, slugs, pids))
    finally:
        server.stop()
    return phases, server_exceptions(server.log)


def profile_slowest(
    args: argparse.Namespace, stress: Phase, log_dir: Path
) -> tuple[dict[str, Any], list[Walk]]:
    """The first server's slowest page at its capacity, profiled in this process (bench/site_profile.py)
    on a study of its own, in the same database."""
    from site_profile import page_profile

    kind = slowest_page(stress)
    print(f"profiling {kind!r}: {args.profile_participants} participants in this process")
    tree = (args.out.with_suffix(".profile.txt") if args.out else log_dir / "profile.txt").resolve()
    return asyncio.run(
        page_profile(
            PROFILE_SLUG, kind, participants=args.profile_participants, timeout_s=args.timeout, tree=tree
        )
    )


def setup_described(
    args: argparse.Namespace, settings: StudySettings, fspo: Path, base: Path, core: int | None
) -> dict[str, str]:
    """What the site runs on, as the report's first table says it."""
    servers = {
        "daphne": "daphne (1 process) serving studyapp.asgi:application",
        "production": f"python -m studyapp.serving: gunicorn, {args.web_workers} uvicorn workers, "
        "static files collected",
    }
    pinned = (
        "" if core is None else f", all on core {core} of {os.cpu_count()} (a GPU host stands behind them)"
    )
    return {
        "server": "; then ".join(servers[kind] for kind in args.servers) + ", DEBUG off",
        "database": f"PostgreSQL {args.database_url.rsplit('@', 1)[-1]}",
        "broker and channel layer": f"Redis {args.redis_url.rsplit('@', 1)[-1]}",
        "workers": f"{args.workers} x celery worker --queues gpu,cpu --pool solo --concurrency 1 "
        f"--prefetch-multiplier 1, torch threads {args.torch_threads}{pinned}",
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
