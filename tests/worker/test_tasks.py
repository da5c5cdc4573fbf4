import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from celery.result import AsyncResult
from channels_redis.core import RedisChannelLayer

from studyapp.realtime import job_group
from worker.tasks import synth_generate, throttled


def send_synth(worker, *, job_id: str, out_dir: Path) -> AsyncResult:
    kwargs = dict(job_id=job_id, domain="reviews", users=4, pairs_per_user=5, seed=0, out_dir=str(out_dir))
    return worker.app.send_task(synth_generate.name, kwargs=kwargs)


def wait_for(worker, result: AsyncResult) -> Any:
    try:
        return result.get(timeout=120)
    except Exception as exc:
        raise AssertionError(
            f"{result.name} failed: {exc!r}\n--- worker log ---\n{worker.log_tail()}"
        ) from exc


def test_it_generates_a_synthetic_dataset_in_a_real_worker(celery_worker, tmp_path: Path) -> None:
    out_dir = tmp_path / "dataset"

    summary = wait_for(celery_worker, send_synth(celery_worker, job_id="test-synth", out_dir=out_dir))

    manifest = json.loads((out_dir / "dataset.json").read_text())
    assert summary["path"] == str(out_dir)
    assert summary["domain"] == "reviews"
    assert summary["counts"]["users"] == 4
    assert summary["counts"]["preferences"] == 4 * 5
    assert manifest["counts"] == summary["counts"]


def test_it_reports_progress_and_the_result_to_the_jobs_group(celery_worker, tmp_path: Path) -> None:
    job_id = f"job-{uuid.uuid4().hex}"
    layer = RedisChannelLayer(hosts=[celery_worker.redis_url])

    async def watch() -> tuple[list[dict], AsyncResult]:
        channel = await layer.new_channel()
        await layer.group_add(job_group(job_id), channel)
        result = await sync_to_async(send_synth)(celery_worker, job_id=job_id, out_dir=tmp_path / "dataset")
        payloads: list[dict] = []
        while not payloads or payloads[-1]["state"] == "PROGRESS":
            try:
                event = await asyncio.wait_for(layer.receive(channel), timeout=120)
            except TimeoutError:
                raise AssertionError(f"no event after {payloads}\n{celery_worker.log_tail()}") from None
            assert event["type"] == "job.progress"
            payloads.append(event["payload"])
        return payloads, result

    payloads, result = asyncio.run(watch())

    summary = wait_for(celery_worker, result)
    *progress, final = payloads
    assert final == {"job_id": job_id, "state": "SUCCESS", "result": summary}
    assert progress and progress[-1] == {
        "job_id": job_id,
        "state": "PROGRESS",
        "done": 20,
        "total": 20,
        "stage": "pairs",
    }


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
