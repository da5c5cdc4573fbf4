import asyncio
import time
from datetime import timedelta
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from celery import Celery
from channels_redis.core import RedisChannelLayer
from django.test import Client
from django.utils import timezone

from studyapp.models import Job, Participant
from studyapp.realtime import job_group, participant_group
from studyapp.services import job_launch
from tests.conftest import RunningWorker
from tests.factories import (
    make_coordinator,
    make_job,
    make_study,
    participant_at_elicitation,
)
from tests.support import coordinator_browser, run_async
from worker.tasks import expire_participants, synth_generate, throttled

Status = Job.Status


@pytest.fixture
def data_dir(settings, tmp_path: Path) -> Path:
    """The studio's data folder for the test: the job's output goes under it (the worker gets the absolute
    path in the job's parameters)."""
    settings.STUDIO_DATA_DIR = str(tmp_path)
    return tmp_path


def wait_until_finished(worker: RunningWorker, job: Job, timeout: float = 120) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.is_finished:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job still {job.status} after {timeout} s\n--- worker log ---\n{worker.log_tail()}")


@pytest.mark.django_db(transaction=True)
def test_a_synth_job_launched_from_the_studio_runs_in_the_worker_and_records_its_progress(
    tasks_go_to_the_worker: RunningWorker, data_dir: Path
) -> None:
    browser: Client = coordinator_browser(make_coordinator())
    form = {"name": "reviews-50", "domain": "reviews", "users": 50, "pairs_per_user": 4, "seed": 0}

    response = browser.post("/studio/jobs/new/synth/", form)

    job = Job.objects.get()
    assert response.status_code == 302
    assert response.url == f"/studio/jobs/{job.pk}/"
    job = wait_until_finished(tasks_go_to_the_worker, job)
    assert job.status == Status.SUCCEEDED, job.error
    assert (job.progress_done, job.progress_total, job.stage) == (200, 200, "pairs")
    assert job.result["counts"]["users"] == 50
    assert job.result["counts"]["preferences"] == 200
    assert Path(job.output_dir) == data_dir / "datasets" / "reviews-50"
    assert (Path(job.output_dir) / "dataset.json").is_file()
    assert [line.split(" ", 2)[2] for line in job.log.splitlines()] == [
        f"queued by {job.created_by.username}",
        "started",
        "pairs: 200/200",
        "succeeded",
    ]


@pytest.mark.django_db(transaction=True)
def test_a_job_launched_while_the_broker_is_down_fails_with_the_brokers_error(
    broker_unreachable: Celery, data_dir: Path
) -> None:
    browser: Client = coordinator_browser(make_coordinator())
    form = {"name": "reviews-5", "domain": "reviews", "users": 5, "pairs_per_user": 4, "seed": 0}

    response = browser.post("/studio/jobs/new/synth/", form)

    job = Job.objects.get()
    assert response.status_code == 302
    assert job.status == Status.FAILED
    assert job.error.startswith("The task queue could not be reached: ")
    assert job.log.splitlines()[-1].split(" ", 2)[2].startswith("failed: The task queue could not be reached")


@pytest.mark.django_db(transaction=True)
def test_it_tells_the_jobs_group_about_its_progress_and_its_end(
    tasks_go_to_the_worker: RunningWorker, data_dir: Path
) -> None:
    layer = RedisChannelLayer(hosts=[tasks_go_to_the_worker.redis_url])

    async def watch() -> list[dict]:
        channel = await layer.new_channel()
        job = await sync_to_async(job_launch)(
            kind=Job.Kind.SYNTH,
            params={"name": "tiny", "domain": "elix", "users": 4, "pairs_per_user": 5, "seed": 0},
        )
        await layer.group_add(job_group(str(job.pk)), channel)
        statuses: list[dict] = []
        while not statuses or not statuses[-1]["finished"]:
            try:
                event = await asyncio.wait_for(layer.receive(channel), timeout=120)
            except TimeoutError:
                raise AssertionError(
                    f"no event after {statuses}\n{tasks_go_to_the_worker.log_tail()}"
                ) from None
            assert event["type"] == "job.progress"
            statuses.append(event["payload"])
        return statuses

    statuses = run_async(watch())

    assert [s["status"] for s in statuses][-1] == Status.SUCCEEDED
    assert {"status": "running", "done": 20, "total": 20, "percent": 100} in [
        {k: s[k] for k in ("status", "done", "total", "percent")} for s in statuses
    ]


@pytest.mark.django_db
def test_it_marks_a_job_failed_with_the_modeling_error(tmp_path: Path) -> None:
    params = {"name": "bad", "domain": "no-such-domain", "users": 4, "pairs_per_user": 5, "seed": 0}
    job = make_job(params=params, output_dir=str(tmp_path / "bad"))

    outcome = synth_generate.apply(args=[str(job.pk)])

    job.refresh_from_db()
    assert outcome.failed()
    assert job.status == Status.FAILED
    assert "no-such-domain" in job.error
    assert job.log.splitlines()[-1].split(" ", 2)[2].startswith("failed: ")


@pytest.mark.django_db
def test_it_does_not_run_a_finished_job_again(tmp_path: Path) -> None:
    job = make_job(status=Status.SUCCEEDED, output_dir=str(tmp_path / "done"), result={"kept": True})

    outcome = synth_generate.apply(args=[str(job.pk)])

    job.refresh_from_db()
    assert outcome.get() == {"job_id": str(job.pk), "skipped": True}
    assert job.result == {"kept": True}
    assert not (tmp_path / "done").exists()


def test_it_throttles_progress_but_passes_each_new_stage_and_the_last_step() -> None:
    now = 0.0
    seen: list[tuple[int, int, str]] = []
    report = throttled(lambda *call: seen.append(call), min_interval=0.25, clock=lambda: now)

    for done, at, stage in [
        (1, 0.0, "a"),
        (2, 0.1, "a"),
        (3, 0.3, "a"),
        (1, 0.31, "b"),
        (9, 0.32, "b"),
        (10, 0.33, "b"),
    ]:
        now = at
        report(done, 10, stage)

    assert seen == [(1, 10, "a"), (3, 10, "a"), (1, 10, "b"), (10, 10, "b")]


def test_celery_beat_runs_the_participant_expiry() -> None:
    from studyapp.celery import app

    (entry,) = [e for e in app.conf.beat_schedule.values() if e["task"] == expire_participants.name]

    assert entry["schedule"] > 0
    assert app.amqp.router.route({}, expire_participants.name)["queue"].name == "cpu"


@pytest.mark.django_db(transaction=True)
def test_the_expiry_task_times_out_stale_participants_in_the_worker_and_tells_their_pages(
    tasks_go_to_the_worker: RunningWorker,
) -> None:
    study = make_study(time_limit_minutes=30)
    # (Not a waiting participant: the worker would be personalizing them, which moves updated_at.)
    stale, active = participant_at_elicitation(study), participant_at_elicitation(study)
    Participant.objects.filter(pk=stale.pk).update(updated_at=timezone.now() - timedelta(minutes=31))
    Participant.objects.filter(pk=active.pk).update(updated_at=timezone.now() - timedelta(minutes=29))
    layer = RedisChannelLayer(hosts=[{"address": tasks_go_to_the_worker.redis_url, "socket_timeout": 60}])

    async def run_and_watch() -> tuple[dict, dict]:
        channel = await layer.new_channel()
        await layer.group_add(participant_group(stale.token), channel)
        result = await sync_to_async(
            lambda: tasks_go_to_the_worker.app.send_task(expire_participants.name).get(timeout=60)
        )()
        event = await asyncio.wait_for(layer.receive(channel), timeout=30)
        return result, event["payload"]

    result, told = run_async(run_and_watch())

    assert result == {"timed_out": 1}
    assert told == {"state": "timed_out", "generation": Participant.Generation.NOT_STARTED, "delayed": False}
    stale.refresh_from_db()
    active.refresh_from_db()
    assert (stale.state, active.state) == (Participant.State.TIMED_OUT, Participant.State.ELICITATION)
