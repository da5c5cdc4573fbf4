"""Ready latency against arrivals: participants' last picks fed at several arrival rates to one real
Celery worker generating with a real tiny model, batching the participants who wait together
(PERSONALIZE_BATCH_MAX) against one participant per task (PERSONALIZE_BATCH_MAX=1), same run.

    ./run bench personalize                                  # 0.5, 1, 2, 4 arrivals/s, 12 each, 8 vs 1
    ./run bench personalize --rates 1,4 --participants 8 --max-new-tokens 32 --out var/bench-personalize.json
    ./run bench personalize --batch-max 4 --eval-questions 4

Each mode starts one worker as a one-GPU host runs one (queues gpu,cpu, solo pool, concurrency 1,
`--torch-threads`), warms it up with one participant (the first task loads the model), then, rate by
rate, on a study of its own: `--participants` participants, each one pick short of the end, make their
last pick through the project's service (elicitation_pick_record: it commits the pick and enqueues
`personalize`, as the site's view does) at Poisson arrival times of that rate (seeded by `--seed`, the
same times in both modes). Once all are ready, their last-pick -> ready times are read on the
database's clock (the last pick's `answered_at` to their responses' `created_at`), and the worker's log
says how many batches it generated them in. Every participant must have exactly arms x questions
responses (the run fails, exit 1, if not).

What it starts: a PostgreSQL database of its own (`--database-url`, created and dropped; its name must
contain "bench"), a Redis database of its own (`--redis-url`, flushed), migrations, the studies through
the project's services with a question pool from a procedural ELIX dataset, and the worker. The model is
the site bench's: a random Llama of the demo's shape (4 layers, hidden 128) with a BPE tokenizer trained on
the dataset, for both arms (so it writes exactly `--max-new-tokens` tokens each time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench_site import environment_set
from site_load import percentile
from site_setup import StudySettings, build_pool_and_model, database_drop, study_seed

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/bench_personalize"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
START_TIMEOUT_S = 120
# worker.tasks.generate_responses's log line, one per batch.
BATCH_LINE = re.compile(r"personalize batch: participants \[([\d, ]*)\], (\d+) generation call")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates",
        type=lambda text: [float(r) for r in text.split(",")],
        default="0.5,1,2,4",
        help="arrivals (last picks) per second, comma-separated, one study each",
    )
    parser.add_argument("--participants", type=int, default=12, help="arriving at each rate")
    parser.add_argument("--batch-max", type=int, default=8, help="PERSONALIZE_BATCH_MAX of the batching mode")
    parser.add_argument("--picks", type=int, default=4, help="pairwise picks per participant (N shots)")
    parser.add_argument("--eval-questions", type=int, default=2, help="evaluation questions per participant")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=1, help="the worker's (OMP_NUM_THREADS)")
    parser.add_argument("--seed", type=int, default=0, help="the arrival times")
    parser.add_argument("--timeout", type=float, default=600, help="bound on each rate's wait, in seconds")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--log-dir", type=Path, help="keep the workers' logs here")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if "bench" not in urlsplit(args.database_url).path:
        parser.error("--database-url: the bench drops this database, so its name must contain 'bench'")
    if args.batch_max < 2:
        parser.error("--batch-max: at least 2 (its peer is 1)")
    if args.participants < 1 or any(rate <= 0 for rate in args.rates):
        parser.error("--participants and every --rates must be positive")
    return args


def arrival_times(count: int, rate: float, seed: int) -> list[float]:
    """A Poisson process of `rate` per second: `count` seconds from the start, the first at 0."""
    rng = random.Random(f"{seed}:{rate}")
    times, t = [], 0.0
    for _ in range(count):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def one_pick_short(study: Any, count: int, label: str) -> list[Any]:
    """`count` participants of `study` who have made every pick but the last."""
    from studyapp.services import (
        elicitation_pick_record,
        participant_consent,
        participant_enroll,
        participant_start_elicitation,
    )

    participants = []
    for i in range(count):
        participant = participant_enroll(study=study, recruitment_id=f"{label}-{i}")
        participant_consent(participant=participant, agreed=True)
        participant = participant_start_elicitation(participant=participant)
        for position in range(participant.n_picks - 1):
            item = participant.elicitation_items.get(position=position)
            elicitation_pick_record(participant=participant, item_id=item.pk, choice="left")
        participants.append(participant)
    return participants


def last_picks_at(participants: list[Any], times: list[float]) -> None:
    """Each participant's last pick at its time (seconds from now), through the project's service."""
    from studyapp.services import elicitation_pick_record

    start = time.monotonic()
    for participant, at in zip(participants, times, strict=True):
        time.sleep(max(0.0, start + at - time.monotonic()))
        item = participant.elicitation_items.get(position=participant.n_picks - 1)
        assert elicitation_pick_record(participant=participant, item_id=item.pk, choice="left")


def ready_seconds(study: Any, count: int, timeout_s: float, worker: Any) -> list[float]:
    """Once every one of the study's `count` participants is ready: each one's last pick -> ready, on
    the database's clock."""
    from django.db.models import Max

    from studyapp.models import Participant

    deadline = time.monotonic() + timeout_s
    waiting = Participant.objects.filter(study=study, state=Participant.State.WAITING)
    while waiting.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{waiting.count()} participants still waiting:\n{worker.log_tail()}")
        time.sleep(0.1)
    rows = Participant.objects.filter(study=study).annotate(
        last_pick=Max("elicitation_items__pick__answered_at"), ready=Max("responses__created_at")
    )
    seconds = [(p.ready - p.last_pick).total_seconds() for p in rows if p.ready and p.last_pick]
    if len(seconds) != count:
        raise RuntimeError(f"{count - len(seconds)} participants have no responses:\n{worker.log_tail()}")
    return seconds


def responses_each(study: Any) -> set[int]:
    """The distinct numbers of responses the study's participants have (one value: all alike)."""
    from django.db.models import Count

    from studyapp.models import Participant

    counts = (
        Participant.objects.filter(study=study).annotate(n=Count("responses")).values_list("n", flat=True)
    )
    return set(counts)


def batches_of(log: str, participant_ids: set[int]) -> list[int]:
    """The sizes of the batches the worker's log shows for these participants."""
    sizes = []
    for match in BATCH_LINE.finditer(log):
        ids = {int(i) for i in match[1].split(",") if i.strip()}
        if ids & participant_ids:
            sizes.append(len(ids))
    return sizes


def measure_mode(
    batch_max: int, args: argparse.Namespace, settings: StudySettings, model: Path, dataset: Path, logs: Path
) -> list[dict[str, Any]]:
    """One worker with PERSONALIZE_BATCH_MAX=`batch_max`, warmed up, then every rate on a study of its
    own: a row per rate."""
    from django.db import connection

    from studyapp.demo_site import WORKER_READY, worker_start

    def study(slug: str) -> Any:
        return study_seed(slug, settings, dataset=dataset, fspo=model, base=model)

    os.environ["PERSONALIZE_BATCH_MAX"] = str(batch_max)
    worker = worker_start(logs, name=f"worker batch {batch_max}", hostname=f"bench-batch{batch_max}")
    rows = []
    try:
        worker.wait_for(WORKER_READY, START_TIMEOUT_S)
        warm = study(f"bench-warm-up-{batch_max}")
        last_picks_at(one_pick_short(warm, 1, f"warm-{batch_max}"), [0.0])
        ready_seconds(warm, 1, args.timeout, worker)
        for rate in args.rates:
            measured = study(f"bench-{batch_max}-{rate:g}".replace(".", "p"))
            participants = one_pick_short(measured, args.participants, f"{batch_max}-{rate:g}")
            times = arrival_times(args.participants, rate, args.seed)
            start = time.monotonic()
            last_picks_at(participants, times)
            seconds = ready_seconds(measured, args.participants, args.timeout, worker)
            sizes = batches_of(worker.log.read_text(errors="replace"), {p.pk for p in participants})
            rows.append(
                {
                    "arrivals_per_s": rate,
                    "batch_max": batch_max,
                    "participants": args.participants,
                    "arrivals_over_s": times[-1],
                    "all_ready_after_s": time.monotonic() - start,
                    "ready_p50_s": percentile(seconds, 50),
                    "ready_p95_s": percentile(seconds, 95),
                    "ready_max_s": max(seconds),
                    "batches": len(sizes),
                    "largest_batch": max(sizes, default=0),
                    "responses_each": sorted(responses_each(measured)),
                }
            )
            print(row_line(rows[-1]), flush=True)
        connection.close()
    finally:
        worker.stop()
    return rows


def row_line(row: dict[str, Any]) -> str:
    return (
        f"| {row['arrivals_per_s']:g} | {row['batch_max']} | {row['participants']} | "
        f"{row['ready_p50_s']:.2f} | {row['ready_p95_s']:.2f} | {row['ready_max_s']:.2f} | "
        f"{row['batches']} | {row['largest_batch']} |"
    )


def main() -> int:
    args = parse_args()
    command = ("./run bench personalize " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    print(f"$ {command}")
    print(f"machine: {os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.2f}")
    settings = StudySettings(args.picks, args.eval_questions, args.max_new_tokens)
    environment_set(args)
    with tempfile.TemporaryDirectory(prefix="bench-personalize-") as tmp_name:
        tmp = Path(tmp_name)
        dataset, model = build_pool_and_model(tmp, build_model=True)
        assert model is not None
        # Set after torch has loaded here: it is for the worker, started below.
        os.environ.update(OMP_NUM_THREADS=str(args.torch_threads), MKL_NUM_THREADS=str(args.torch_threads))
        database_drop(args.database_url, create=True)
        try:
            rows = run(args, settings, model, dataset, args.log_dir or tmp)
        finally:
            database_drop(args.database_url)
    expected = 2 * args.eval_questions  # two arms
    ok = all(row["responses_each"] == [expected] for row in rows)
    summary = {"command": command, "machine_cores": os.cpu_count(), "rows": rows, "ok": ok}
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print("PASS: every participant has their responses once" if ok else "FAIL: see responses_each")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
        print(f"results written to {args.out}")
    return 0 if ok else 1


def run(
    args: argparse.Namespace, settings: StudySettings, model: Path, dataset: Path, logs: Path
) -> list[dict[str, Any]]:
    import django
    import redis

    django.setup()
    from django.core.management import call_command

    redis.Redis.from_url(args.redis_url).flushdb()
    call_command("migrate", interactive=False, verbosity=0)
    logs.mkdir(parents=True, exist_ok=True)
    print(
        f"{args.participants} participants per rate, {args.picks} picks, {args.eval_questions} questions x 2 arms,"
    )
    print(
        f"{args.max_new_tokens} new tokens, one worker ({args.torch_threads} torch thread); last pick -> ready:"
    )
    print("| arrivals/s | batch max | participants | p50 s | p95 s | max s | batches | largest |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for batch_max in (args.batch_max, 1):
        rows += measure_mode(batch_max, args, settings, model, dataset, logs)
    return rows


if __name__ == "__main__":
    sys.exit(main())
