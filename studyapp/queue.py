"""The one place that puts tasks on the queue: every task the web side can enqueue, by its registered
name, and the queue it runs on (settings.CELERY_TASK_ROUTES is built from these names).

The web side never imports worker/ (the arrow is tasks -> services): it sends by name, so loading a page
never loads the tasks' modeling code. Services send from a `transaction.on_commit` callback, never
mid-transaction, so a worker never looks for a row that is not committed yet (or never will be).
"""

from celery import current_app
from kombu.exceptions import OperationalError

TASKS_MODULE = "worker.tasks"
PERSONALIZE = f"{TASKS_MODULE}.personalize"
SYNTH_GENERATE = f"{TASKS_MODULE}.synth_generate"
TRAIN_CHECKPOINT = f"{TASKS_MODULE}.train_checkpoint"
EVALUATE_ARMS = f"{TASKS_MODULE}.evaluate_arms"
CROWD_REPORT = f"{TASKS_MODULE}.crowd_report"
EXPIRE_PARTICIPANTS = f"{TASKS_MODULE}.expire_participants"
SWEEP_STALE_WORK = f"{TASKS_MODULE}.sweep_stale_work"

GPU, CPU = "gpu", "cpu"
# Model work runs on `gpu` (one worker per GPU, concurrency 1), everything else on `cpu`.
TASK_QUEUES: dict[str, str] = {
    PERSONALIZE: GPU,
    TRAIN_CHECKPOINT: GPU,
    EVALUATE_ARMS: GPU,
    SYNTH_GENERATE: CPU,
    CROWD_REPORT: CPU,
    EXPIRE_PARTICIPANTS: CPU,
    SWEEP_STALE_WORK: CPU,
}
# A model task added later under one of these families' names (worker.tasks.train_fspo, say) goes to
# `gpu` without a route of its own; any other task goes to the default queue, `cpu`.
GPU_TASK_FAMILIES = ("personalize", "train", "evaluate")


def task_routes() -> dict[str, dict[str, str]]:
    """CELERY_TASK_ROUTES: each task's queue by name, then the GPU families as glob patterns (Celery
    looks up an exact name before any pattern)."""
    routes = {name: {"queue": queue} for name, queue in TASK_QUEUES.items()}
    routes.update({f"{TASKS_MODULE}.{family}*": {"queue": GPU} for family in GPU_TASK_FAMILIES})
    return routes


class QueueUnavailable(Exception):
    """The broker could not take the task (down, unreachable, refusing): nothing was enqueued."""


def enqueue(name: str, *args: object, task_id: str | None = None) -> None:
    """Send the task `name` with `args` to its queue, through the current Celery app (its routes pick
    the queue). Raises QueueUnavailable, with the broker's error, when the broker cannot be reached once
    Celery's own publish retries are spent."""
    if name not in TASK_QUEUES:
        raise ValueError(f"{name} is not a task the web side enqueues")
    try:
        # ignore_result: the web side never waits for a task's return value (tasks report through the
        # services, into the database), so it does not subscribe to the result backend for it.
        current_app.send_task(name, args=list(args), task_id=task_id, ignore_result=True)
    except OperationalError as exc:
        raise QueueUnavailable(f"The task queue could not be reached: {exc}") from exc
