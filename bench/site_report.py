"""What the site bench found: the database counted against what the participants were acknowledged,
latency tables, the workers' task times, as JSON-ready data (what --out writes) and as the printed report."""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from site_load import READY_POLL_S, Phase
from site_setup import StudySettings, TaskRun

from studyapp.scripted_participant import Recorder, Walk

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


def database_check(study: Any, walked: list[Walk], settings: StudySettings) -> dict[str, Any]:
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


def ready_on_database_clock(walked: list[Walk]) -> list[float]:
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
    phases: dict[str, Phase],
    studies: tuple[Any, Any],
    runs: list[TaskRun],
) -> dict[str, Any]:
    """Everything measured, as JSON-ready data (what --out writes and the report prints): the phases of
    `measure` on the studies (sequential, load test), the workers' task runs, the database counted."""
    warm, seq, load = phases["warm-up"], phases["sequential"], phases["load test"]
    seq_study, load_study = studies
    tasks = _task_times(runs, load_study)
    checks = {
        "sequential (incl. warm-up)": database_check(seq_study, warm.walked + seq.walked, settings),
        "load test": database_check(load_study, load.walked, settings),
    }
    other_errors = sum(warm.recorder.errors.values()) + sum(seq.recorder.errors.values())
    summary = {
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()[0]},
        "setup": setup,
        "settings": asdict(settings) | {"ratings": settings.ratings, "workers": args.workers},
        "ready_latency_s": _ready_latency(seq, other_errors),
        "load": _load_summary(load, args.participants, args.poll_interval),
        "personalize_tasks_s": tasks,
        "database": checks,
    }
    errors = summary["load"]["errors"]
    summary["ok"] = errors == 0 and other_errors == 0 and all(c["ok"] for c in checks.values())
    return summary


def _ready_latency(seq: Phase, errors: int) -> dict[str, Any]:
    """(a): the sequential participants' wait from their last pick to their responses."""
    return {
        "participants": len(seq.walked),
        f"status endpoint (polled every {READY_POLL_S * 1000:.0f} ms)": _stats(
            [w.ready_s for w in seq.walked if w.ready_s is not None]
        ),
        "database clock (last pick `answered_at` -> responses `created_at`)": _stats(
            ready_on_database_clock(seq.walked)
        ),
        "errors": errors,
    }


def _load_summary(load: Phase, participants: int, poll_interval_s: float) -> dict[str, Any]:
    """(b): the load test's requests, errors and latencies (`participants` at once)."""
    rec = load.recorder
    return {
        "participants": participants,
        "completed": sum(w.completed for w in load.walked),
        "seconds": load.seconds,
        "requests": len(rec.samples),
        "requests_per_s": len(rec.samples) / load.seconds if rec.samples else 0.0,
        "errors": sum(rec.errors.values()),
        "errors_by_category": dict(rec.errors),
        "error_examples": rec.examples,
        "latency_ms": latency_table(rec),
        "status_poll_interval_s": poll_interval_s,
        "ready_on_database_clock_s": _stats(ready_on_database_clock(load.walked)),
        "cpu_s": load.cpu_s,
    }


def _task_times(runs: list[TaskRun], load_study: Any) -> dict[str, Any]:
    """The personalize tasks the workers logged: the first of each (it loads the model), then the
    sequential participants' and the load test's."""
    from studyapp.models import Participant

    load_ids = set(Participant.objects.filter(study=load_study).values_list("id", flat=True))
    timed = [r for r in runs if not (r.skipped or r.first)]
    return {
        "finished": len(runs),
        "skipped_as_already_done": sum(r.skipped for r in runs),
        "per_worker": dict(Counter(f"worker {r.worker}" for r in runs)),
        "first_per_worker_incl_model_load": [r.seconds for r in runs if r.first],
        "sequential": _stats([r.seconds for r in timed if r.participant_id not in load_ids]),
        "load test": _stats([r.seconds for r in timed if r.participant_id in load_ids]),
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
