"""Celery tasks. Each one is thin: an id in, one modeling entry point, progress out (through services).

Each task is registered under its name in studyapp.queue (what the web side enqueues by, and what
CELERY_TASK_ROUTES in settings routes to its queue). modeling's heavy parts are imported inside each task: a
worker imports every task module at start, and torch should load only where a job runs (the selectors
import only modeling.data, the light episode schema).
"""

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_ready
from django.conf import settings
from django.db import connection

from annotation.selectors import ArmEpisodes, PersonalizationRequest, personalization_request
from studyapp import queue
from studyapp.models import Job
from studyapp.services import (
    NewResponse,
    generations_recover,
    job_fail,
    job_heartbeat,
    job_log_append,
    job_progress_record,
    job_start,
    job_succeed,
    jobs_recover,
    participant_generation_fail,
    participant_generation_requeue,
    participant_generation_retry_later,
    participant_generation_sent,
    participant_generation_start,
    participant_generations_claim,
    participant_generations_heartbeat,
    participants_expire,
    responses_store,
)

ProgressCallback = Callable[[int, int, str], None]
logger = logging.getLogger(__name__)


@contextmanager
def heartbeat(beat: Callable[[], None], *, every_s: float | None = None) -> Iterator[None]:
    """Call `beat` every `every_s` seconds (settings.HEARTBEAT_INTERVAL_S) from a thread of its own while
    the block runs: the sign of life by which the stale-work sweeper tells a busy worker from a dead one
    (a model call can hold the task's own thread for minutes). A beat that fails is logged; the thread's
    database connection is closed when the block ends."""
    interval = settings.HEARTBEAT_INTERVAL_S if every_s is None else every_s
    stop = threading.Event()

    def run() -> None:
        try:
            while not stop.wait(interval):
                try:
                    beat()
                except Exception:
                    logger.warning("heartbeat failed", exc_info=True)
        finally:
            connection.close()

    thread = threading.Thread(target=run, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 5)


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
    """A modeling progress callback `cb(done, total, stage)` that records the job's progress (its page is
    told) and the task's Celery state, about four times a second at most, and writes a log line at each
    tenth of a stage's total."""
    logged = {"total": -1, "tenth": -1}

    def report(done: int, total: int, stage: str) -> None:
        tenth = 10 * done // total if total > 0 else 0
        line = ""
        if total != logged["total"] or tenth > logged["tenth"]:
            logged.update(total=total, tenth=tenth)
            line = f"{stage}: {done:,}/{total:,}"
        task.update_state(state="PROGRESS", meta={"done": done, "total": total, "stage": stage})
        job_progress_record(job_id=job_id, done=done, total=total, stage=stage, log_line=line)

    return throttled(report, min_interval=0.25)


JobWork = Callable[[Job, ProgressCallback], dict[str, Any]]


def _plain(value: Any) -> Any:
    """numpy scalars and paths in a result, as JSON takes them."""
    return value.item() if hasattr(value, "item") else str(value)


def run_job(task: Task, job_id: str, work: JobWork) -> dict[str, Any]:
    """Run a coordinator's job: mark it running, call `work(job, progress)` (one modeling entry point),
    then store its result, or its error (and re-raise it, so Celery records the failure too). A job that
    has already finished (a redelivered message) is not run again."""
    job = job_start(job_id=job_id, celery_task_id=task.request.id or "")
    if job is None:
        return {"job_id": job_id, "skipped": True}
    try:
        with heartbeat(functools.partial(job_heartbeat, job_id=job_id)):
            result = json.loads(json.dumps(work(job, progress_reporter(task, job_id)), default=_plain))
    except Exception as exc:
        job_fail(job_id=job_id, error=f"{type(exc).__name__}: {exc}")
        raise
    job_succeed(job_id=job_id, result=result)
    return result


# Jobs are not retried: a failed job says why on its page, and the coordinator launches another. A job
# whose worker died is queued again by the stale-work sweeper (or redelivered, acks_late) and starts
# again; training resumes from its checkpoint-last, and its log says from which step.
@shared_task(name=queue.SYNTH_GENERATE, bind=True, acks_late=True)
def synth_generate(self: Task, job_id: str) -> dict[str, Any]:
    """Generate the job's synthetic dataset (modeling.synth.generate_dataset) into its output folder;
    the result is the dataset's summary (counts, quality)."""

    def work(job: Job, progress: ProgressCallback) -> dict[str, Any]:
        from modeling.synth import generate_dataset

        p = job.params
        dataset = generate_dataset(
            out_dir=job.output_dir,
            domain=p["domain"],
            users=p["users"],
            pairs_per_user=p["pairs_per_user"],
            seed=p["seed"],
            progress=progress,
        )
        return dataset.to_dict()

    return run_job(self, job_id, work)


def _metrics_line(row: dict[str, Any]) -> str:
    """A training log row (step, loss, held-out metrics) as one line of the job's log."""
    values = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "step"
    )
    return f"step {row.get('step')}: {values}"


@shared_task(name=queue.TRAIN_CHECKPOINT, bind=True, acks_late=True)
def train_checkpoint(self: Task, job_id: str) -> dict[str, Any]:
    """Train one stage (modeling.train.train) into the job's output folder; the result is the run's
    metrics (final held-out loss and accuracy, the evaluation history, parameter counts)."""

    def work(job: Job, progress: ProgressCallback) -> dict[str, Any]:
        from modeling.train import TrainConfig, train

        def log(row: dict[str, Any]) -> None:
            job_log_append(job_id=job_id, line=_metrics_line(row))

        result = train(TrainConfig(**job.params["config"]), progress=progress, log=log)
        return {"path": str(result.out_dir), **result.metrics}

    return run_job(self, job_id, work)


@shared_task(name=queue.EVALUATE_ARMS, bind=True, acks_late=True)
def evaluate_arms(self: Task, job_id: str) -> dict[str, Any]:
    """Evaluate the job's arms against its baseline on held-out synthetic users (modeling.evaluate);
    the result is the win-rate table, and the run folder holds report.md and the plots."""

    def work(job: Job, progress: ProgressCallback) -> dict[str, Any]:
        from modeling.evaluate import Arm, evaluate

        p = job.params
        result = evaluate(
            p["dataset"],
            [Arm(**arm) for arm in p["arms"]],
            baseline=p["baseline"],
            out_dir=job.output_dir,
            episodes=p["episodes"],
            shots=p["shots"],
            progress=progress,
        )
        return {
            "table": result.table,
            "shot_sweep": result.shot_sweep,
            "report": str(result.out_dir / "report.md"),
        }

    return run_job(self, job_id, work)


@shared_task(name=queue.CROWD_REPORT, bind=True, acks_late=True)
def crowd_report(self: Task, job_id: str) -> dict[str, Any]:
    """An imported crowd's report (modeling.analysis.crowd_report.crowd_report_from_source: the LLMFAO
    files analysed as `fspo analyze crowd` does, without an LLM) into the job's output folder; the result
    is the judges' kappas and the rankings' Spearman rho, and the folder holds report.md, crowd.json and
    the plots."""

    def work(job: Job, progress: ProgressCallback) -> dict[str, Any]:
        from modeling.analysis.crowd_report import crowd_report_from_source

        p = job.params
        run = crowd_report_from_source(
            p["source"],
            job.output_dir,
            seed=p["seed"],
            resamples=p["resamples"],
            baselines=p["baselines"],
            progress=progress,
        )
        a = run.analysis
        return {
            "kappa": {j.judge: j.kappa for j in a.judges},
            "spearman": a.ranking.spearman,
            "judgments": a.judgments,
            "report": str(run.out_dir / "report.md"),
        }

    return run_job(self, job_id, work)


@functools.lru_cache(maxsize=4)
def generation_backend(spec: str) -> Any:
    """The personalization back end of a checkpoint spec, loaded once per worker process and reused for
    every participant (a GPU worker keeps its arms' weights resident; the least recently used of more
    than four is dropped). vLLM specs (``vllm:DIR``) of one base share one engine, each adapter a LoRA
    request on it (``modeling.infer.vllm_engine``)."""
    from modeling.infer import ModelSpec, backend_from_spec

    parsed = ModelSpec.parse(spec)
    options: dict[str, Any] = {}
    if parsed.is_local:
        options = {"device": settings.GENERATION_DEVICE, "dtype": settings.GENERATION_DTYPE}
    elif parsed.kind == "vllm":  # the process's one engine per base model; vLLM places it on the GPU
        options = {"dtype": settings.GENERATION_DTYPE}
    return backend_from_spec(parsed, **options)


def generate_responses(requests: Sequence[PersonalizationRequest]) -> dict[int, list[NewResponse]]:
    """Every arm's response to each question of each request (one participant's), by participant id,
    through one modeling entry point.

    Every arm of every participant that shares a checkpoint and decoding goes to the model in one call:
    batched across participants, each participant's few-shot prefix computed once (a no-context arm's
    episodes simply have no shots). Logs how many participants went in how many calls."""
    from modeling.infer import generate_for_episodes

    groups: dict[tuple[str, bool, int], list[tuple[PersonalizationRequest, ArmEpisodes]]] = {}
    for request in requests:
        for arm in request.arms:
            groups.setdefault((arm.checkpoint, arm.cot, request.max_new_tokens), []).append((request, arm))
    responses: dict[int, list[NewResponse]] = {r.participant_id: [] for r in requests}
    for (checkpoint, cot, max_new_tokens), work in groups.items():
        episodes = [e for _, arm in work for e in arm.episodes]
        generations = generate_for_episodes(
            generation_backend(checkpoint), episodes, cot=cot, max_new_tokens=max_new_tokens
        )
        start = 0
        for request, arm in work:
            n = len(request.question_ids)
            for question_id, g in zip(request.question_ids, generations[start : start + n], strict=True):
                responses[request.participant_id].append(
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
            start += n
    logger.info("personalize batch: participants %s, %d generation call(s)", sorted(responses), len(groups))
    return responses


def _store_claimed(
    requests: Sequence[PersonalizationRequest], responses: dict[int, list[NewResponse]]
) -> int:
    """Store the responses of the participants a batch claimed; one whose store fails is queued again on
    its own (the others are stored all the same). Returns how many were stored."""
    stored = 0
    for request in requests:
        pid = request.participant_id
        try:
            stored += responses_store(participant_id=pid, responses=responses[pid])
        except Exception as exc:
            logger.warning("participant %s: storing the batch's responses failed", pid, exc_info=True)
            participant_generation_requeue(participant_id=pid, error=f"retrying alone after: {exc!r}")
    return stored


@shared_task(
    name=queue.PERSONALIZE,
    bind=True,
    acks_late=True,
    max_retries=settings.PERSONALIZE_MAX_RETRIES,
    soft_time_limit=max(1, settings.PERSONALIZE_TIME_LIMIT_S - 30),
    time_limit=settings.PERSONALIZE_TIME_LIMIT_S,
)
def personalize(self: Task, participant_id: int) -> dict[str, Any]:
    """Generate every arm's responses to a participant's evaluation questions from their picks, store
    them with the participant's A/B items, and tell their waiting page; with them, in one batch, the
    study's other participants who wait at this moment (services.participant_generations_claim, up to
    settings.PERSONALIZE_BATCH_MAX in all).

    Idempotent: a participant who already has responses, is being generated (in another batch), or is
    gone is skipped, so a redelivered or duplicate task, or the task of a participant a batch took, does
    nothing. A failure is retried with back-off; the last one marks the participant's generation failed
    (they see a message, coordinators the error) and is raised. The participants a failed batch claimed
    are queued again, each with a task of its own."""
    request = personalization_request(participant_id=participant_id)
    if request is None or not participant_generation_start(participant_id=participant_id):
        return {"participant_id": participant_id, "stored": 0, "skipped": True}
    claimed = participant_generations_claim(
        participant_id=participant_id, limit=settings.PERSONALIZE_BATCH_MAX - 1
    )
    if claimed:
        logger.info("personalize(%s): generating %s with it, in one batch", participant_id, claimed)
    others = [r for pid in claimed if (r := personalization_request(participant_id=pid)) is not None]
    try:
        with heartbeat(
            functools.partial(participant_generations_heartbeat, participant_ids=[participant_id, *claimed])
        ):
            responses = generate_responses([request, *others])
        batched = _store_claimed(others, responses)
        stored = responses_store(participant_id=participant_id, responses=responses[participant_id])
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        for pid in claimed:  # a stored one has moved on and is left as it is
            participant_generation_requeue(participant_id=pid, error=f"retrying alone after: {error}")
        if self.request.retries >= self.max_retries:
            participant_generation_fail(participant_id=participant_id, error=error)
            raise
        delay = settings.PERSONALIZE_RETRY_DELAY_S * 2**self.request.retries
        participant_generation_retry_later(participant_id=participant_id, error=error)  # queued again
        retry = self.retry(exc=exc, countdown=delay)  # sends the retry; raised below
        participant_generation_sent(participant_id=participant_id)
        raise retry from exc
    return {
        "participant_id": participant_id,
        "stored": len(responses[participant_id]) if stored else 0,
        "skipped": not stored,
        "batched": batched,
    }


@shared_task(name=queue.EXPIRE_PARTICIPANTS)
def expire_participants() -> dict[str, int]:
    """Time out the participants who have been inactive past their study's time limit
    (services.participants_expire). Run every few minutes by Celery beat (CELERY_BEAT_SCHEDULE); safe to
    run again at any time."""
    return {"timed_out": participants_expire()}


@shared_task(name=queue.SWEEP_STALE_WORK)
def sweep_stale_work() -> dict[str, int]:
    """Queue again what lost its worker, and send what never reached the broker
    (services.generations_recover, services.jobs_recover). Run by Celery beat every
    settings.STALE_WORK_SWEEP_S and by every worker as it starts; safe to run at any time, anywhere."""
    return {**generations_recover(), "jobs_requeued": jobs_recover()}


@worker_ready.connect
def _sweep_on_start(**_: Any) -> None:
    """A worker that starts (after a crash, say) looks for stale work at once rather than at the next
    beat."""
    try:
        logger.info("stale work at start: %s", sweep_stale_work())
    except Exception:
        logger.warning("the stale-work sweep at start failed", exc_info=True)
    finally:
        connection.close()
