"""The crowd report job in a real Celery worker process: launched from the imported study's analysis page,
run by the worker on the cpu queue, shown on that page once done (a slice of the shared LLMFAO data)."""

from pathlib import Path

import pytest
from django.urls import reverse

from modeling.llmfao import ENV_DIR
from studyapp.models import Job
from studyapp.services.imports import LLMFAO_SLUG, llmfao_study_import
from tests.conftest import RunningWorker
from tests.factories import make_coordinator
from tests.support import coordinator_browser
from tests.worker.test_tasks import wait_until_finished


@pytest.mark.django_db(transaction=True)
def test_the_worker_runs_the_crowd_report_and_the_analysis_page_then_shows_it(
    tasks_go_to_the_worker: RunningWorker,
    llmfao_slice: Path,
    settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.STUDIO_DATA_DIR = str(tmp_path)
    monkeypatch.setenv(ENV_DIR, str(llmfao_slice))
    llmfao_study_import(source=llmfao_slice)
    client = coordinator_browser(make_coordinator())

    client.post(reverse("studio-study-crowd-report", kwargs={"slug": LLMFAO_SLUG}))

    job = wait_until_finished(tasks_go_to_the_worker, Job.objects.get(), timeout=90)
    assert job.status == Job.Status.SUCCEEDED, job.error
    assert (job.progress_done, job.progress_total, job.stage) == (4, 4, "done")
    assert (Path(job.output_dir) / "report.md").is_file()
    page = client.get(reverse("studio-study-analysis", kwargs={"slug": LLMFAO_SLUG})).content.decode()
    kappa = f"{job.result['kappa']['gpt-4']:.3f}".replace("-", "−")
    assert f'data-value="kappa">{kappa}<' in page
    assert 'id="crowd-ranking-table"' in page and "Compute the crowd report again" in page
