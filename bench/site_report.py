"""What the site bench found: the database counted against what the participants were acknowledged,
latency tables, stress levels and capacity, the workers' task times, as JSON-ready data (what --out
writes; site_tables.py prints it)."""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from site_load import (
    READY_POLL_S,
    STATUS_POLL,
    STRESS_P95_LIMIT_S,
    Phase,
    human_pacing,
    percentile,
    samples_sent_between,
)
from site_setup import StudySettings, TaskRun

from studyapp.scripted_participant import Recorder, Sample, Walk

ALL_PAGES = "all pages (not the status polls)"
# The human mode's goal for the pages (every request but the status polls).
GOAL = {"page_p95_ms": 150.0, "page_p99_ms": 400.0, "errors": 0}

# Counting


EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception): .*)$", re.MULTILINE)


def server_exceptions(log: Path) -> dict[str, int]:
    """The exceptions the server's log reports (the last line of each traceback), most frequent first."""
    lines = EXCEPTION_LINE.findall(log.read_text(errors="replace"))
    return dict(Counter(re.sub(r"port \d+", "port N", line)[:200] for line in lines).most_common(5))


def latency_table(samples: list[Sample]) -> list[dict[str, Any]]:
    """Latency by request kind, over all requests and over all pages (every request but the status
    polls), in milliseconds."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        by_kind[sample.kind].append(sample.seconds)
    kinds = sorted(by_kind, key=lambda k: (_step_order(k), k))
    by_kind["all requests"] = [sample.seconds for sample in samples]
    by_kind[ALL_PAGES] = [sample.seconds for sample in samples if sample.kind != STATUS_POLL]
    return [
        {
            "kind": kind,
            "count": len(values),
            **{f"p{q}_ms": 1000 * percentile(values, q) for q in (50, 95, 99)},
            "max_ms": 1000 * max(values, default=float("nan")),
        }
        for kind in ["all requests", ALL_PAGES, *kinds]
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
    by_server: dict[str, dict[str, Phase]],
    studies: tuple[Any, dict[str, Any]],
    runs: list[TaskRun],
) -> dict[str, Any]:
    """Everything measured, as JSON-ready data (what --out writes and the report prints): the phases of
    the mode on each server (`by_server`), on the first study (warm-up, burst's sequential) and each
    server's measured one (`studies`), the workers' task runs, the database counted."""
    first_study, measured = studies
    first_walked = [
        w for phases in by_server.values() for n, p in phases.items() if n in FIRST for w in p.walked
    ]
    checks = {"warm-up and sequential": database_check(first_study, first_walked, settings)}
    errors = sum(sum(p.recorder.errors.values()) for phases in by_server.values() for p in phases.values())
    summary: dict[str, Any] = {
        "mode": args.mode,
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()[0]},
        "setup": setup,
        "settings": asdict(settings) | {"ratings": settings.ratings, "workers": args.workers},
    }
    for kind, phases in by_server.items():
        name, phase = next((n, p) for n, p in phases.items() if n not in FIRST)
        label = name if len(by_server) == 1 else f"{name} ({kind})"
        checks[label] = database_check(measured[kind], phase.walked, settings)
        if args.mode == "burst":
            summary["ready_latency_s"] = _ready_latency(phases["sequential"], phases["warm-up"])
            summary["load"] = _load_summary(phase, args.participants, args.poll_interval)
        elif args.mode == "human":
            summary["human"] = _human_summary(args, phase)
        else:
            summary.setdefault("stress", {})[kind] = _stress_summary(phase)
    summary["personalize_tasks_s"] = _task_times(runs, list(measured.values()))
    summary["database"] = checks
    summary["errors"] = errors
    summary["ok"] = errors == 0 and all(c["ok"] for c in checks.values())
    return summary


FIRST = ("warm-up", "sequential")  # the phases on the first study


def _ready_latency(seq: Phase, warm: Phase) -> dict[str, Any]:
    """Burst's (a): the sequential participants' wait from their last pick to their responses."""
    return {
        "participants": len(seq.walked),
        f"status endpoint (polled every {READY_POLL_S * 1000:.0f} ms)": _stats(
            [w.ready_s for w in seq.walked if w.ready_s is not None]
        ),
        "database clock (last pick `answered_at` -> responses `created_at`)": _stats(
            ready_on_database_clock(seq.walked)
        ),
        "errors": sum(seq.recorder.errors.values()) + sum(warm.recorder.errors.values()),
    }


def _requests(phase: Phase) -> dict[str, Any]:
    """A phase's participants, requests, errors and latencies (by kind, over all, over the pages)."""
    rec = phase.recorder
    return {
        "completed": sum(w.completed for w in phase.walked),
        "seconds": phase.seconds,
        "requests": len(rec.samples),
        "requests_per_s": len(rec.samples) / phase.seconds if rec.samples else 0.0,
        "errors": sum(rec.errors.values()),
        "errors_by_category": dict(rec.errors),
        "error_examples": rec.examples,
        "latency_ms": latency_table(rec.samples),
        "cpu_s": phase.cpu_s,
    }


def _load_summary(load: Phase, participants: int, poll_interval_s: float) -> dict[str, Any]:
    """Burst's (b): the load test's requests, errors and latencies (`participants` at once)."""
    return {
        "participants": participants,
        **_requests(load),
        "status_poll_interval_s": poll_interval_s,
        "ready_on_database_clock_s": _stats(ready_on_database_clock(load.walked)),
    }


def _human_summary(args: argparse.Namespace, phase: Phase) -> dict[str, Any]:
    """The human mode: the pages' latency against GOAL, last pick -> ready."""
    found = _requests(phase)
    pages = next(row for row in found["latency_ms"] if row["kind"] == ALL_PAGES)
    goal = {
        **GOAL,
        "found": {"page_p95_ms": pages["p95_ms"], "page_p99_ms": pages["p99_ms"], "errors": found["errors"]},
    }
    goal["met"] = (
        pages["p95_ms"] < GOAL["page_p95_ms"]
        and pages["p99_ms"] < GOAL["page_p99_ms"]
        and not found["errors"]
    )
    ready = [w.ready_s for w in phase.walked if w.ready_s is not None]
    return {
        "participants": args.participants,
        "arrival_s": args.arrival_s,
        "arrivals": f"uniform at random over {args.arrival_s:g} s, seed {args.seed}",
        "think_time": human_pacing(args).describe(),
        **found,
        "status_poll_interval_s": args.poll_interval,
        "last_pick_to_ready_s": {
            f"status endpoint (polled every {args.poll_interval:g} s)": _stats(ready),
            "database clock": _stats(ready_on_database_clock(phase.walked)),
        },
        "goal": goal,
    }


def _stress_summary(phase: Phase) -> dict[str, Any]:
    """The stress levels of one server, and its capacity: the requests per second at the last level
    whose pages' p95 was under STRESS_P95_LIMIT_S."""
    levels = [_level(phase.recorder, *window) for window in phase.levels]
    capacity = _capacity(levels)
    found = _requests(phase)
    return {
        "levels": levels,
        "capacity": {
            "requests_per_s": capacity["requests_per_s"] if capacity else 0.0,
            "pages_per_s": capacity["pages_per_s"] if capacity else 0.0,
            "participants_at_once": capacity["participants_at_once"] if capacity else 0,
            # False: the levels ran out first, so the capacity is at least this.
            "p95_limit_passed": any(row["page_p95_ms"] >= 1000 * STRESS_P95_LIMIT_S for row in levels),
        },
        "participants_walked": len(phase.walked),
        **{k: found[k] for k in ("completed", "errors", "errors_by_category", "error_examples", "cpu_s")},
        "ready_on_database_clock_s": _stats(ready_on_database_clock(phase.walked)),
    }


def _level(rec: Recorder, concurrency: int, start: float, end: float) -> dict[str, Any]:
    """One stress level: the requests sent in its window, their rate and the pages' latency."""
    sent = samples_sent_between(rec, start, end)
    pages = [s.seconds for s in sent if s.kind != STATUS_POLL]
    by_kind = {row["kind"]: row for row in latency_table(sent)}
    # A page's own request, not its replays (a double-click's second POST, a stale one: the same view).
    page_kinds = [k for k in by_kind if k not in ("all requests", ALL_PAGES, STATUS_POLL) and ")" not in k]
    slowest = max(page_kinds, key=lambda k: by_kind[k]["p95_ms"], default="")
    return {
        "participants_at_once": concurrency,
        "seconds": end - start,
        "requests": len(sent),
        "requests_per_s": len(sent) / (end - start),
        "pages_per_s": len(pages) / (end - start),
        **{f"page_p{q}_ms": 1000 * percentile(pages, q) for q in (50, 95, 99)},
        "slowest_page": slowest,
        "slowest_page_p95_ms": by_kind[slowest]["p95_ms"] if slowest else float("nan"),
    }


def slowest_page(phase: Phase) -> str:
    """The page kind with the highest p95 at the stress phase's capacity (its first level if none was
    under the limit)."""
    levels = [_level(phase.recorder, *window) for window in phase.levels]
    at = _capacity(levels) or (levels[0] if levels else {"slowest_page": ""})
    return str(at["slowest_page"])


def _capacity(levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last level before the first whose pages' p95 passed the limit (None: the first did)."""
    under = None
    for row in levels:
        if row["page_p95_ms"] >= 1000 * STRESS_P95_LIMIT_S:
            break
        under = row
    return under


def _task_times(runs: list[TaskRun], measured_studies: list[Any]) -> dict[str, Any]:
    """The personalize tasks the workers logged: the first of each (it loads the model), then those of
    the first study's participants (warm-up, sequential) and of the measured phases'."""
    from studyapp.models import Participant

    measured_ids = set(Participant.objects.filter(study__in=measured_studies).values_list("id", flat=True))
    timed = [r for r in runs if not (r.skipped or r.first)]
    return {
        "finished": len(runs),
        # A participant a batch took has its own task skip; any other skip is a duplicate.
        "generated_in_batches": sum(r.batched for r in runs),
        "skipped_as_already_done": sum(r.skipped for r in runs) - sum(r.batched for r in runs),
        "per_worker": dict(Counter(f"worker {r.worker}" for r in runs)),
        "first_per_worker_incl_model_load": [r.seconds for r in runs if r.first],
        "warm-up and sequential": _stats([r.seconds for r in timed if r.participant_id not in measured_ids]),
        "measured": _stats([r.seconds for r in timed if r.participant_id in measured_ids]),
    }
