"""The imported LLMFAO study's crowd report on its analysis page: a button queues a crowd_report job (the
LLMFAO files analysed as `fspo analyze crowd` does), and once it has run the page shows the crowd against
the GPT judges and the Bradley-Terry ranking beside theirs, with the plots. On a slice of the shared data."""

import json
import re
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from modeling.llmfao import ENV_DIR
from studyapp.models import Job
from studyapp.services.imports import LLMFAO_SLUG, llmfao_study_import
from tests.factories import make_analyst, make_coordinator, make_study
from tests.support import coordinator_browser
from worker.tasks import crowd_report

pytestmark = pytest.mark.django_db
JUDGMENTS = 269  # in the llmfao_slice fixture (tests/conftest.py): those between the 6 most judged models


@pytest.fixture
def imported(llmfao_slice: Path, settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The slice imported into llmfao-crowd, the LLMFAO files found at it, the data folder a temporary one."""
    settings.STUDIO_DATA_DIR = str(tmp_path)
    monkeypatch.setenv(ENV_DIR, str(llmfao_slice))
    llmfao_study_import(source=llmfao_slice)
    return llmfao_slice


def compute(client: Client, slug: str = LLMFAO_SLUG):
    return client.post(reverse("studio-study-crowd-report", kwargs={"slug": slug}))


def analysis_page(client: Client) -> str:
    response = client.get(reverse("studio-study-analysis", kwargs={"slug": LLMFAO_SLUG}))
    assert response.status_code == 200
    return response.content.decode()


def row_of(page: str, model: str) -> str:
    return page[page.index(f'<tr data-model="{model}">') :].split("</tr>")[0]


def ranks(page: str, model: str) -> list[str]:
    """The model's row of the ranking table: its crowd rank and each judge's rank."""
    return re.findall(r'<td class="num">(\d+)</td>', row_of(page, model))


def test_the_button_queues_a_crowd_report_job_of_the_llmfao_files(imported: Path, tmp_path: Path) -> None:
    client = coordinator_browser(make_coordinator())
    assert 'id="crowd-report-compute"' in analysis_page(client)

    response = compute(client)

    job = Job.objects.get()
    assert response.status_code == 302 and response.url == reverse("studio-job", kwargs={"job_id": job.pk})
    assert (job.kind, job.status, job.study.slug) == (Job.Kind.CROWD_REPORT, Job.Status.QUEUED, LLMFAO_SLUG)
    assert job.params == {
        "name": LLMFAO_SLUG,
        "source": str(imported),
        "seed": 0,
        "resamples": 1000,
        "baselines": True,
    }
    assert Path(job.output_dir) == tmp_path / "crowd-reports" / LLMFAO_SLUG
    assert 'id="crowd-report-running"' in analysis_page(client)


def test_a_second_click_while_it_is_queued_gives_the_same_job(imported: Path) -> None:
    client = coordinator_browser(make_coordinator())

    first, second = compute(client), compute(client)

    assert Job.objects.count() == 1 and first.url == second.url


def test_without_the_llmfao_files_it_says_where_it_looked_and_queues_nothing(
    imported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "nowhere"))
    client = coordinator_browser(make_coordinator())

    response = compute(client)

    assert response.status_code == 302 and not Job.objects.exists()
    page = analysis_page(client)
    assert "The LLMFAO data was not found" in page and f"{tmp_path / 'nowhere'}: no such folder" in page


def test_a_study_that_is_not_imported_has_no_crowd_report(imported: Path) -> None:
    study = make_study(slug="live")
    client = coordinator_browser(make_coordinator())

    compute(client, slug=study.slug)

    assert not Job.objects.exists()
    page = client.get(reverse("studio-study-analysis", kwargs={"slug": "live"})).content.decode()
    assert "holds no imported crowd" in page and 'id="crowd-report"' not in page


def test_an_analyst_sees_the_report_but_cannot_compute_it(imported: Path) -> None:
    client = coordinator_browser(make_analyst())

    assert compute(client).status_code == 403
    assert 'id="crowd-report-compute"' not in analysis_page(client) and not Job.objects.exists()


def test_once_the_job_has_run_the_page_shows_the_judges_kappa_the_ranking_and_the_plots(
    imported: Path,
) -> None:
    client = coordinator_browser(make_coordinator())
    compute(client)
    job = Job.objects.get()

    crowd_report.apply(args=[str(job.pk)])  # the worker's task, in this process

    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED, job.error
    assert set(job.result["kappa"]) == {"gpt-4", "gpt-3.5"} and job.result["judgments"] == JUDGMENTS
    page = analysis_page(client)
    kappa = f"{job.result['kappa']['gpt-4']:.3f}".replace("-", "−")
    assert 'data-judge="gpt-4"' in page, page[page.find('id="crowd-report"') :][:3000]
    assert f'data-value="kappa">{kappa}<' in page
    ranking = json.loads((Path(job.output_dir) / "crowd.json").read_text())["ranking"]
    best, score = ranking["models"][0], ranking["crowd"][0]
    gpt4_best = ranking["models"][max(range(6), key=lambda i: ranking["judges"]["gpt-4"][i])]
    assert len(set(ranking["crowd"])) == 6  # a real fit: six different scores
    assert ranks(page, best)[0] == "1" and f"{score:.2f}" in row_of(page, best)
    assert ranks(page, gpt4_best)[1] == "1"  # crowd rank, then the gpt-4 rank, then the gpt-3.5 rank
    assert f"gpt-4 <strong>{job.result['spearman']['gpt-4']:.3f}</strong>" in page
    for name in ("crowd-agreement.png", "crowd-ranking.png"):
        url = reverse("studio-job-file", kwargs={"job_id": job.pk, "name": name})
        assert url in page
        served = client.get(url)
        assert served.status_code == 200 and b"".join(served.streaming_content).startswith(b"\x89PNG")
    job_page = client.get(reverse("studio-job", kwargs={"job_id": job.pk})).content.decode()
    assert "Bradley–Terry ranking of the models" in job_page
