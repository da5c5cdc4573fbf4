"""Celery tasks. Each one is thin: plain arguments or ids in, one modeling entry point, progress out.

Queues come from CELERY_TASK_ROUTES in settings. modeling is imported inside each task: a worker imports
every task module at start, and heavy dependencies (torch) should load only where a job runs.
"""

import time
from collections.abc import Callable
from typing import Any

from celery import Task, shared_task

from studyapp.realtime import notify_job

ProgressCallback = Callable[[int, int, str], None]


def throttled(
    report: ProgressCallback, *, min_interval: float = 0.25, clock: Callable[[], float] = time.monotonic
) -> ProgressCallback:
    """Pass calls on to `report` at most once per `min_interval` seconds; the first call of a stage and
    the final step (done == total) always go through."""
    last_sent = -float("inf")
    last_stage: str | None = None

    def maybe_report(done: int, total: int, stage: str) -> None:
        nonlocal last_sent, last_stage
        now = clock()
        if stage == last_stage and done < total and now - last_sent < min_interval:
            return
        last_sent, last_stage = now, stage
        report(done, total, stage)

    return maybe_report


def progress_reporter(task: Task, job_id: str) -> ProgressCallback:
    """A modeling progress callback `cb(done, total, stage)` that updates the task's Celery state and
    tells the job's watchers, about four times a second at most."""

    def report(done: int, total: int, stage: str) -> None:
        meta = {"done": done, "total": total, "stage": stage}
        task.update_state(state="PROGRESS", meta=meta)
        notify_job(job_id, {"job_id": job_id, "state": "PROGRESS", **meta})

    return throttled(report, min_interval=0.25)


@shared_task(bind=True, acks_late=True)
def synth_generate(
    self: Task, *, job_id: str, domain: str, users: int, pairs_per_user: int, seed: int, out_dir: str
) -> dict[str, Any]:
    """Generate a synthetic preference dataset into `out_dir`; returns the dataset's summary."""
    from modeling.synth import generate_dataset

    try:
        dataset = generate_dataset(
            domain=domain,
            out_dir=out_dir,
            users=users,
            pairs_per_user=pairs_per_user,
            seed=seed,
            progress=progress_reporter(self, job_id),
        )
    except Exception as exc:
        notify_job(job_id, {"job_id": job_id, "state": "FAILURE", "error": f"{type(exc).__name__}: {exc}"})
        raise
    summary = dataset.to_dict()
    notify_job(job_id, {"job_id": job_id, "state": "SUCCESS", "result": summary})
    return summary
