"""Celery tasks. Each one is thin: plain arguments or ids in, one modeling entry point, progress out.

Queues come from CELERY_TASK_ROUTES in settings. modeling's heavy parts are imported inside each task: a
worker imports every task module at start, and torch should load only where a job runs (the selectors
import only modeling.data, the light episode schema).
"""

import functools
import time
from collections.abc import Callable
from typing import Any

from celery import Task, shared_task
from django.conf import settings

from annotation.selectors import ArmEpisodes, PersonalizationRequest, personalization_request
from annotation.services import NewResponse, responses_store
from studyapp.realtime import notify_job
from studyapp.services import participant_generation_fail, participant_generation_start

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


@functools.lru_cache(maxsize=4)
def generation_backend(spec: str) -> Any:
    """The personalization back end of a checkpoint spec, loaded once per worker process and reused for
    every participant (a GPU worker keeps its arms' weights resident; the least recently used of more
    than four is dropped)."""
    from modeling.infer import backend_from_spec

    local = not spec.startswith(("http://", "https://", "vllm:"))
    options = {"device": settings.GENERATION_DEVICE, "dtype": settings.GENERATION_DTYPE} if local else {}
    return backend_from_spec(spec, **options)


def generate_responses(request: PersonalizationRequest) -> list[NewResponse]:
    """Every arm's response to each question of the request, through one modeling entry point.

    Arms that share a checkpoint and decoding go to the model in one call: batched, with the
    participant's few-shot prefix computed once (a no-context arm's episodes simply have no shots)."""
    from modeling.infer import generate_for_episodes

    groups: dict[tuple[str, bool], list[ArmEpisodes]] = {}
    for arm in request.arms:
        groups.setdefault((arm.checkpoint, arm.cot), []).append(arm)
    n = len(request.question_ids)
    responses = []
    for (checkpoint, cot), arms in groups.items():
        episodes = [e for arm in arms for e in arm.episodes]
        generations = generate_for_episodes(
            generation_backend(checkpoint), episodes, cot=cot, max_new_tokens=request.max_new_tokens
        )
        for k, arm in enumerate(arms):
            for question_id, g in zip(request.question_ids, generations[k * n : (k + 1) * n], strict=True):
                responses.append(
                    NewResponse(
                        arm_id=arm.arm_id,
                        question_id=question_id,
                        text=g.text,
                        user_description=g.description or "",
                        prompt_tokens=g.prompt_tokens,
                        new_tokens=g.new_tokens,
                        finish_reason=g.finish_reason,
                    )
                )
    return responses


@shared_task(
    bind=True,
    acks_late=True,
    max_retries=settings.PERSONALIZE_MAX_RETRIES,
    soft_time_limit=max(1, settings.PERSONALIZE_TIME_LIMIT_S - 30),
    time_limit=settings.PERSONALIZE_TIME_LIMIT_S,
)
def personalize(self: Task, participant_id: int) -> dict[str, Any]:
    """Generate every arm's responses to a participant's evaluation questions from their picks, store
    them with the participant's A/B items, and tell their waiting page.

    Idempotent: a participant who already has responses (or is gone) is skipped, so a redelivered or
    duplicate task does nothing. A failure is retried with back-off; the last one marks the participant's
    generation failed (they see a message, coordinators the error) and is raised."""
    request = personalization_request(participant_id=participant_id)
    if request is None or not participant_generation_start(participant_id=participant_id):
        return {"participant_id": participant_id, "stored": 0, "skipped": True}
    try:
        responses = generate_responses(request)
        stored = responses_store(participant_id=participant_id, responses=responses)
    except Exception as exc:
        if self.request.retries >= self.max_retries:
            participant_generation_fail(participant_id=participant_id, error=f"{type(exc).__name__}: {exc}")
            raise
        delay = settings.PERSONALIZE_RETRY_DELAY_S * 2**self.request.retries
        raise self.retry(exc=exc, countdown=delay) from exc
    return {
        "participant_id": participant_id,
        "stored": len(responses) if stored else 0,
        "skipped": not stored,
    }
