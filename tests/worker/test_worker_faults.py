"""Workers that die: real `celery worker` processes killed with SIGKILL or stopped with SIGTERM in the
middle of a participant's generation or a training job, and a new worker started in their place.

Each test has a Redis database of its own (TEST_FAULT_WORKER_REDIS_DB, default 6; flushed) and starts
its workers with short heartbeats and sweeps (HEARTBEAT_INTERVAL_S=1, STALE_WORK_AFTER_S=3,
STALE_WORK_SWEEP_S=1) so a lost worker is noticed in seconds rather than the production 30 s: the
mechanism is the same (worker.tasks.heartbeat, the stale-work sweeper run by beat and at worker start).
The times they print are what a coordinator would see with these settings, not assertions.
"""

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery

from annotation.models import GeneratedResponse
from studyapp.models import Job, Participant
from studyapp.queue import TRAIN_CHECKPOINT
from studyapp.services import job_enqueue
from tests.conftest import (
    start_celery_worker,
    stop_process,
    tasks_sent_through,
    worker_client,
    worker_redis_url,
)
from tests.factories import make_coordinator, make_job, make_study, participant_at_elicitation, pick
from tests.support import coordinator_browser

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

State, Generation = Participant.State, Participant.Generation
FAULT_WORKER_REDIS_DB = int(os.environ.get("TEST_FAULT_WORKER_REDIS_DB", "6"))
FAST_RECOVERY = {"HEARTBEAT_INTERVAL_S": "1", "STALE_WORK_AFTER_S": "3", "STALE_WORK_SWEEP_S": "1"}


@dataclass
class Workers:
    """Start workers, one after another, on one Redis database; every one is stopped at the end."""

    client: Celery
    redis_url: str
    logs: Path
    procs: list[subprocess.Popen]

    def start(self, *, beat: bool = False) -> subprocess.Popen:
        log = self.logs / f"worker-{len(self.procs) + 1}.log"
        proc = start_celery_worker(self.client, self.redis_url, log, env=FAST_RECOVERY, beat=beat)
        self.procs.append(proc)
        return proc

    def log(self, number: int) -> str:
        return (self.logs / f"worker-{number}.log").read_text(errors="replace")


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    url = worker_redis_url(FAULT_WORKER_REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    client = worker_client(url)
    team = Workers(client, url, tmp_path, [])
    try:
        with tasks_sent_through(client):
            yield team
    finally:
        for proc in team.procs:
            stop_process(proc, timeout=15)
        client.close()


def until(what: str, done: Callable[[], bool], workers: Workers, timeout: float = 120) -> None:
    """Wait for `done()`. Fails, with the workers' logs, after `timeout`."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            logs = "\n".join(
                f"--- worker {n + 1} ---\n{workers.log(n + 1)[-3000:]}" for n in range(len(workers.procs))
            )
            raise AssertionError(f"{what}: not within {timeout} s\n{logs}")
        time.sleep(0.1)


def generation(participant: Participant) -> tuple[str, str]:
    participant.refresh_from_db()
    return participant.state, participant.generation


def last_pick(participant: Participant) -> None:
    for position in range(participant.picks_done, participant.n_picks):
        pick(participant, position)


def test_a_generation_whose_worker_is_sigkilled_is_written_once_by_the_next_worker(
    workers: Workers, tiny_checkpoint: Path
) -> None:
    study = make_study(checkpoint=str(tiny_checkpoint), max_new_tokens=200)
    participant = participant_at_elicitation(study)
    first = workers.start()
    last_pick(participant)
    until("the first worker beats", lambda: _beaten_since_start(participant), workers)

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert generation(participant) == (State.WAITING, Generation.RUNNING)  # its message is never acked
    assert not GeneratedResponse.objects.filter(participant=participant).exists()

    back = time.monotonic()
    workers.start(beat=True)
    until("responses ready", lambda: generation(participant) == (State.RATING, Generation.READY), workers)
    print(f"ready {time.monotonic() - back:.1f} s after the second worker was started")

    arms = study.arms.count()
    assert GeneratedResponse.objects.filter(participant=participant).count() == arms * study.n_eval_questions
    assert "generation queued again (its worker was lost)" in workers.log(2)


def _beaten_since_start(participant: Participant) -> bool:
    """The generation is running and its heartbeat thread has beaten at least once after the start."""
    participant.refresh_from_db()
    beat, started = participant.generation_heartbeat_at, participant.updated_at
    return participant.generation == Generation.RUNNING and beat is not None and beat > started


def test_a_pick_made_while_the_worker_was_stopped_with_sigterm_is_generated_when_one_is_back(
    workers: Workers, tiny_checkpoint: Path
) -> None:
    study = make_study(checkpoint=str(tiny_checkpoint))
    participant = participant_at_elicitation(study)
    first = workers.start()
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0  # a warm shutdown

    last_pick(participant)
    assert generation(participant) == (State.WAITING, Generation.QUEUED)
    participant.refresh_from_db()
    assert participant.generation_sent_at is not None  # the broker holds it for the next worker

    back = time.monotonic()
    workers.start()
    until("responses ready", lambda: generation(participant) == (State.RATING, Generation.READY), workers)
    print(f"ready {time.monotonic() - back:.1f} s after the new worker was started")
    arms = study.arms.count()
    assert GeneratedResponse.objects.filter(participant=participant).count() == arms * study.n_eval_questions


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modeling.synth import generate_dataset

    out = tmp_path_factory.mktemp("worker-faults-ds") / "elix"
    return generate_dataset(out_dir=out, domain="elix", users=60, pairs_per_user=6, seed=0).path


def test_a_training_job_whose_worker_is_sigkilled_resumes_from_its_last_checkpoint(
    workers: Workers, tiny_dataset: Path, tmp_path: Path
) -> None:
    from modeling.train import TrainConfig, load_checkpoint_manifest

    out = tmp_path / "checkpoint"
    config = TrainConfig(
        dataset=str(tiny_dataset),
        out_dir=str(out),
        stage="pretrain",
        tiny={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "vocab_size": 300},
        steps=60,
        batch_size=2,
        save_every=10,
        eval_every=1000,
        eval_episodes=4,
        max_prompt_tokens=512,
    )
    job = make_job(kind=Job.Kind.TRAIN, params={"config": config.to_dict()}, output_dir=str(out))
    first = workers.start()
    job_enqueue(TRAIN_CHECKPOINT, str(job.pk), str(job.pk))

    def saved_and_running() -> bool:
        job.refresh_from_db()
        return (out / "checkpoint-last").is_dir() and job.status == Job.Status.RUNNING

    until("a checkpoint-last is written", saved_and_running, workers)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    job.refresh_from_db()
    killed_at = job.progress_done
    assert job.status == Job.Status.RUNNING and killed_at < 60

    back = time.monotonic()
    workers.start(beat=True)
    until("the job succeeds", lambda: _status(job) == Job.Status.SUCCEEDED, workers, timeout=300)
    print(
        f"killed at step {killed_at}; done {time.monotonic() - back:.1f} s after the second worker was started"
    )

    job.refresh_from_db()
    assert "its worker was lost" in job.log and "started again (its worker was lost)" in job.log
    resumed = [line for line in job.log.splitlines() if "resumed_from checkpoint-last" in line]
    assert len(resumed) == 1, job.log
    resumed_step = int(resumed[0].split("step ")[1].split(":")[0])
    assert 0 < resumed_step <= killed_at  # from the last save, not from the start
    assert load_checkpoint_manifest(out)["stage"] == "pretrain"
    # The coordinator's job page shows it.
    page = coordinator_browser(make_coordinator()).get(f"/studio/jobs/{job.pk}/")
    assert page.status_code == 200 and "resumed_from checkpoint-last" in page.content.decode()


def _status(job: Job) -> str:
    job.refresh_from_db()
    return job.status
