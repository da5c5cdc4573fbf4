"""Coordinators' jobs (synthetic generation, training, evaluation, an imported crowd's report): launched from the studio, run by the
worker (worker/tasks.py), which reports through the job_* services here. Every change to a job tells its
page (realtime.notify_job) once the transaction commits."""

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import transaction
from django.utils import timezone

from studyapp import queue
from studyapp.datastore import (
    CHECKPOINT_MANIFEST,
    DATASET_MANIFEST,
    output_dir_for,
    relative_to_root,
    resolve_in_data_root,
)
from studyapp.models import Job, Study, stale_work_cutoff
from studyapp.realtime import notify_job_on_commit
from studyapp.selectors import job_status

# The Celery task of each kind (routed to its queue by CELERY_TASK_ROUTES).
JOB_TASKS: dict[str, str] = {
    Job.Kind.SYNTH: queue.SYNTH_GENERATE,
    Job.Kind.TRAIN: queue.TRAIN_CHECKPOINT,
    Job.Kind.EVALUATE: queue.EVALUATE_ARMS,
    Job.Kind.CROWD_REPORT: queue.CROWD_REPORT,
}
# A file whose presence means the job's output is complete (it is written last).
JOB_OUTPUT_MARKERS: dict[str, str] = {
    Job.Kind.SYNTH: DATASET_MANIFEST,
    Job.Kind.TRAIN: CHECKPOINT_MANIFEST,
    Job.Kind.EVALUATE: "report.md",
    Job.Kind.CROWD_REPORT: "report.md",
}
ACTIVE_JOB_STATES = (Job.Status.QUEUED, Job.Status.RUNNING)


def job_launch(
    *, kind: str, params: Mapping[str, Any], created_by: Any = None, study: Study | None = None
) -> Job:
    """Check a job's parameters, create it (queued) and enqueue its task once the transaction commits.

    `params["name"]` names the job's output folder under the data folder (datasets/, checkpoints/ or
    evaluations/); the other parameters depend on the kind (see _synth_params, _train_params,
    _evaluate_params): paths are relative to the data folder, and the modeling side's own config checks
    run here, so a bad job is refused with a ValidationError and nothing is created."""
    if kind not in JOB_TASKS:
        raise ValidationError(f"There is no job of kind '{kind}'.")
    name = str(params.get("name", "")).strip()
    try:
        validate_slug(name)
    except ValidationError:
        raise ValidationError(
            {"name": ["Name the output with letters, numbers, hyphens or underscores only."]}
        ) from None
    output_dir = output_dir_for(kind, name)
    if (output_dir / JOB_OUTPUT_MARKERS[kind]).exists():
        raise ValidationError(
            {"name": [f"{relative_to_root(output_dir)} exists already; choose another name."]}
        )
    worker_params = {"name": name, **JOB_PARAMS[kind]({**params, "name": name}, output_dir)}
    with transaction.atomic():
        if Job.objects.filter(output_dir=str(output_dir), status__in=ACTIVE_JOB_STATES).exists():
            raise ValidationError(
                {"name": [f"Another job is already writing {relative_to_root(output_dir)}."]}
            )
        task_id = str(uuid.uuid4())
        who = getattr(created_by, "get_username", lambda: "")() or "someone"
        job = Job.objects.create(
            kind=kind,
            params=worker_params,
            output_dir=str(output_dir),
            study=study,
            created_by=created_by,
            celery_task_id=task_id,
            log=_log_line(f"queued by {who}"),
        )
        transaction.on_commit(partial(job_enqueue, JOB_TASKS[kind], str(job.pk), task_id))
        return job


def job_enqueue(task_name: str, job_id: str, task_id: str) -> None:
    """Send the job's task (an on_commit callback). When the broker cannot take it, the job fails with
    the broker's error instead of staying queued for ever (the coordinator launches it again)."""
    try:
        queue.enqueue(task_name, job_id, task_id=task_id)
    except queue.QueueUnavailable as exc:
        job_fail(job_id=job_id, error=str(exc))


def _config_error(exc: ValueError) -> ValidationError:
    return ValidationError(
        str(exc).removeprefix("invalid synth config: ").removeprefix("invalid train config: ")
    )


def _pick(params: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValidationError(f"The job is missing the parameters {', '.join(missing)}.")
    return {k: params[k] for k in keys}


def _in_data_root(path: str, *, field: str, what: str) -> Path:
    try:
        return resolve_in_data_root(path, what=what)
    except ValidationError as exc:
        raise ValidationError({field: exc.messages}) from None


def _dataset(path: str) -> Path:
    from modeling.synth import DatasetError, load_dataset

    resolved = _in_data_root(path, field="dataset", what="dataset")
    try:
        load_dataset(resolved)
    except DatasetError as exc:
        raise ValidationError({"dataset": [str(exc)]}) from None
    return resolved


def _synth_params(params: Mapping[str, Any], output_dir: Path) -> dict[str, Any]:
    """domain (a built-in domain), users, pairs_per_user, seed."""
    from modeling.synth import BUILTIN_DOMAINS, SynthConfig

    if params.get("domain") not in BUILTIN_DOMAINS:
        raise ValidationError({"domain": [f"Choose one of {', '.join(BUILTIN_DOMAINS)}."]})
    clean = _pick(params, ("domain", "users", "pairs_per_user", "seed"))
    try:
        SynthConfig(**clean)
    except ValueError as exc:
        raise _config_error(exc) from None
    return clean


def _train_params(params: Mapping[str, Any], output_dir: Path) -> dict[str, Any]:
    """dataset; init (a checkpoint to start from, empty for a pretrain from scratch); stage, context,
    cot, shots (lo, hi), steps, batch_size, lr, seed: the modeling.train.TrainConfig fields."""
    from modeling.train import TrainConfig  # loads torch: only when a training job is launched

    init = str(params.get("init") or "").strip()
    init_dir = _in_data_root(init, field="init", what="starting checkpoint") if init else None
    if init_dir is not None and not init_dir.is_dir():
        raise ValidationError({"init": [f"{init} is not a folder in the data folder."]})
    fields = _pick(params, ("stage", "context", "cot", "shots", "steps", "batch_size", "lr", "seed"))
    fields["shots"] = tuple(fields["shots"])
    try:
        config = TrainConfig(
            dataset=str(_dataset(str(params.get("dataset", "")))),
            out_dir=str(output_dir),
            init=str(init_dir) if init_dir else None,
            **fields,
        )
    except ValueError as exc:
        raise _config_error(exc) from None
    return {"config": json.loads(json.dumps(config.to_dict()))}


def _evaluate_params(params: Mapping[str, Any], output_dir: Path) -> dict[str, Any]:
    """dataset; arms (lines of name=checkpoint[:context][:cot], checkpoints in the data folder);
    baseline (an arm's name); episodes; shots."""
    from modeling.evaluate import Arm as EvalArm

    problems, arms = [], []
    for number, line in enumerate(str(params.get("arms", "")).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            arm = EvalArm.parse(line.strip())
            model = resolve_in_data_root(arm.model, what=f"checkpoint of arm '{arm.name}'")
        except (ValueError, ValidationError) as exc:
            problems += [f"Line {number}: {m}" for m in getattr(exc, "messages", [str(exc)])]
            continue
        if not model.is_dir():
            problems.append(f"Line {number}: {arm.model} is not a folder in the data folder.")
        arms.append(asdict(arm) | {"model": str(model)})
    names = [arm["name"] for arm in arms]
    if not problems and len(names) < 2:
        problems.append("Give at least two arms: the arms to evaluate and the baseline.")
    problems += [f"Two arms are named '{n}'." for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise ValidationError({"arms": problems})
    if params.get("baseline") not in names:
        raise ValidationError({"baseline": [f"The baseline must be one of the arms: {', '.join(names)}."]})
    counts = _pick(params, ("episodes", "shots"))
    return {
        "dataset": str(_dataset(str(params.get("dataset", "")))),
        "arms": arms,
        "baseline": params["baseline"],
        "episodes": int(counts["episodes"]),
        "shots": int(counts["shots"]),
    }


def _crowd_report_params(params: Mapping[str, Any], output_dir: Path) -> dict[str, Any]:
    """source (the LLMFAO folder; by default modeling.llmfao.default_source: $FSPO_LLMFAO_DIR or the
    shared folder), seed, resamples, baselines (the few-shot baselines too; no LLM either way)."""
    from modeling.llmfao import LLMFAOError, check_source_files, default_source

    source = Path(str(params.get("source") or default_source()))
    try:
        check_source_files(source)
    except LLMFAOError as exc:
        raise ValidationError(
            f"The LLMFAO data was not found: {exc}. Put the LLMFAO files there, or set FSPO_LLMFAO_DIR "
            "to the folder that holds them."
        ) from None
    seed, resamples = params.get("seed", 0), params.get("resamples", 1000)
    if not isinstance(seed, int) or not isinstance(resamples, int) or resamples < 1:
        raise ValidationError("The seed must be a whole number and resamples a positive one.")
    return {
        "source": str(source),
        "seed": seed,
        "resamples": resamples,
        "baselines": bool(params.get("baselines", True)),
    }


JOB_PARAMS: dict[str, Callable[[Mapping[str, Any], Path], dict[str, Any]]] = {
    Job.Kind.SYNTH: _synth_params,
    Job.Kind.TRAIN: _train_params,
    Job.Kind.EVALUATE: _evaluate_params,
    Job.Kind.CROWD_REPORT: _crowd_report_params,
}


def _log_line(message: str) -> str:
    return f"{timezone.now():%Y-%m-%d %H:%M:%S} {message}\n"


def _job_change(job_id: str) -> Job | None:
    """The job, locked until the end of the transaction (every change to a job goes through this)."""
    return Job.objects.select_for_update().filter(pk=job_id).first()


def _job_save(job: Job, log: str = "") -> None:
    job.log += _log_line(log) if log else ""
    job.save()
    notify_job_on_commit(str(job.pk), job_status(job=job))


def job_start(*, job_id: str, celery_task_id: str = "") -> Job | None:
    """A worker has picked the job up: it is running. None when there is nothing to run: the job is gone,
    has finished, or is running on a live worker (a duplicate or redelivered message). A job found running
    with no heartbeat for settings.STALE_WORK_AFTER_S was lost with its worker and starts again (training
    resumes from its last checkpoint)."""
    with transaction.atomic():
        job = _job_change(job_id)
        if job is None or job.is_finished or (job.status == Job.Status.RUNNING and not job.is_lost()):
            return None
        again = job.status == Job.Status.RUNNING or job.started_at is not None
        now = timezone.now()
        job.status, job.started_at, job.heartbeat_at, job.error = Job.Status.RUNNING, now, now, ""
        job.celery_task_id = celery_task_id or job.celery_task_id
        _job_save(job, "started again (its worker was lost)" if again else "started")
        return job


def job_heartbeat(*, job_id: str) -> None:
    """The worker running the job is alive (every settings.HEARTBEAT_INTERVAL_S)."""
    Job.objects.filter(pk=job_id, status=Job.Status.RUNNING).update(heartbeat_at=timezone.now())


def jobs_recover(*, now: datetime | None = None) -> int:
    """The stale-work sweeper's part for jobs: a running job with no heartbeat for
    settings.STALE_WORK_AFTER_S lost its worker; it is queued again (its page says so) and the next
    worker starts it again, a training run resuming from its checkpoint-last. Returns how many."""
    stale = stale_work_cutoff(now)
    lost = Job.objects.filter(status=Job.Status.RUNNING, heartbeat_at__lt=stale).values_list("pk", flat=True)
    requeued = 0
    for job_id in lost:
        with transaction.atomic():
            job = _job_change(str(job_id))
            if job is None or not job.is_lost(stale=stale):
                continue
            job.status, job.celery_task_id = Job.Status.QUEUED, str(uuid.uuid4())
            quiet = int((timezone.now() - job.heartbeat_at).total_seconds()) if job.heartbeat_at else 0
            _job_save(job, f"its worker was lost (no sign of life for {quiet} s): queued again")
            transaction.on_commit(partial(job_enqueue, JOB_TASKS[job.kind], str(job.pk), job.celery_task_id))
            requeued += 1
    return requeued


def job_progress_record(*, job_id: str, done: int, total: int, stage: str, log_line: str = "") -> None:
    """Record a running job's progress (from the modeling entry point's progress callback)."""
    with transaction.atomic():
        job = _job_change(job_id)
        if job is None or job.status != Job.Status.RUNNING:
            return
        job.progress_done, job.progress_total, job.stage = max(done, 0), max(total, 0), stage[:200]
        job.heartbeat_at = timezone.now()
        _job_save(job, log_line)


def job_log_append(*, job_id: str, line: str) -> None:
    with transaction.atomic():
        job = _job_change(job_id)
        if job is not None:
            _job_save(job, line)


def job_succeed(*, job_id: str, result: Mapping[str, Any]) -> None:
    """The job finished: store what the modeling entry point returned (its metrics) with the job."""
    with transaction.atomic():
        job = _job_change(job_id)
        if job is None:
            return
        job.status, job.finished_at, job.result = Job.Status.SUCCEEDED, timezone.now(), dict(result)
        if job.progress_total:
            job.progress_done = job.progress_total
        _job_save(job, "succeeded")


def job_fail(*, job_id: str, error: str) -> None:
    with transaction.atomic():
        job = _job_change(job_id)
        if job is None:
            return
        job.status, job.finished_at, job.error = Job.Status.FAILED, timezone.now(), error
        _job_save(job, f"failed: {error.splitlines()[0] if error else 'no message'}")
