"""The studio's analysis page and its report download: the library's numbers on the page and in the zip,
the synthetic side chosen inside the data folder, rules changed in the form, and who may see it."""

import io
import json
import zipfile
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from annotation.analysis import study_analysis
from modeling.analysis import AnalysisOptions, ExclusionRules, synthetic_inputs
from studyapp.models import Study
from studyapp.selectors import study_win_rates
from tests.factories import (
    Persona,
    make_analyst,
    make_coordinator,
    make_simulated_study,
    simulate_participant,
)
from tests.support import browser_of, coordinator_browser

pytestmark = pytest.mark.django_db


@pytest.fixture
def study() -> Study:
    """Four simulated participants (no self-descriptions, so no embedding model is needed), one of whom
    fails the attention check."""
    study = make_simulated_study(n_pairs=3, pool_pairs=4, n_eval_questions=3)
    for i, persona in enumerate(
        [
            Persona(0.9, survey={"age_range": "25-34", "occupation": "nurse"}),
            Persona(0.7, survey={"age_range": "18-24", "occupation": "teacher"}),
            Persona(0.8, 0.5, survey={"age_range": "65+"}),
            Persona(0.2, passes_attention=False),
        ]
    ):
        simulate_participant(study, persona, seed=i)
    return study


def page(client: Client, study: Study, query: str = "") -> str:
    response = client.get(reverse("studio-study-analysis", kwargs={"slug": study.slug}) + query)
    assert response.status_code == 200
    return response.content.decode()


def expected(study: Study, **rules: object):
    return study_analysis(
        study=study,
        options=AnalysisOptions(rules=ExclusionRules(**rules)),  # type: ignore[arg-type]
        synthetic=synthetic_inputs(domain=study.domain),
    )


def test_it_shows_an_analyst_every_analysis_with_the_librarys_numbers(study: Study) -> None:
    analysis = expected(study)

    html = page(coordinator_browser(make_analyst()), study)

    for section in ("counted", "win-rates", "transfer", "consistency", "shots", "shift", "descriptions"):
        assert f'id="{section}"' in html
    for row in analysis.win_rates.rows:
        assert f"{100 * row.win_rate:.1f}%" in html
        assert f"{100 * row.ci_low:.1f}% – {100 * row.ci_high:.1f}%" in html
    assert (
        f"Counted {len(analysis.selection.included)} of 4 exported participants (left out: 1 failed attention)."
        in html
    )
    assert html.count('src="data:image/png;base64,') == len(analysis.figures())
    assert "No synthetic evaluation given" in html
    assert "Every counted participant made N = 3 picks" in html  # one N: no shot curve, said so


def test_it_serves_the_same_report_as_a_zip(study: Study) -> None:
    analysis = expected(study)

    response = coordinator_browser(make_coordinator()).get(
        reverse("studio-study-analysis-download", kwargs={"slug": study.slug})
    )

    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="{study.slug}-analysis.zip"'
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = sorted(archive.namelist())
    assert names == sorted(
        f"{study.slug}-analysis/{n}" for n in ["report.md", "analysis.json", *analysis.figures()]
    )
    saved = json.loads(archive.read(f"{study.slug}-analysis/analysis.json"))
    assert saved["win_rates"] == analysis.to_json()["win_rates"]
    assert "## Human win rate per arm pair" in archive.read(f"{study.slug}-analysis/report.md").decode()


def test_it_compares_with_a_synthetic_evaluation_chosen_in_the_data_folder(
    study: Study, settings, tmp_path: Path
) -> None:
    settings.STUDIO_DATA_DIR = str(tmp_path)
    run = tmp_path / "evaluations" / "arms"
    run.mkdir(parents=True)
    table = [
        {"arm": "base", "model": "/ckpt/base", "context": "none", "cot": False, "win_rate": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 80},
        {"arm": "fspo", "model": "/ckpt/fspo", "cot": False, "win_rate": 0.87, "ci_low": 0.8, "ci_high": 0.93, "n": 80},
    ]  # fmt: skip
    (run / "results.json").write_text(json.dumps({"baseline": "base", "shots": 3, "table": table}))
    real = next(r for r in expected(study).win_rates.rows if r.arm == "fspo")

    html = page(coordinator_browser(make_analyst()), study, "?evaluation=evaluations/arms")

    assert '<option value="evaluations/arms">' in html
    assert "87.0%" in html and f"{100 * (0.87 - real.win_rate):+.1f} pts".replace("-", "−") in html
    assert "The synthetic evaluation ran no arm as /ckpt/cot (few-shot, CoT)." in html
    assert "The evaluation&#x27;s dataset was not found, so its domain could not be checked." in html


def test_it_refuses_a_path_outside_the_data_folder_beside_its_field(
    study: Study, settings, tmp_path: Path
) -> None:
    settings.STUDIO_DATA_DIR = str(tmp_path / "data")
    client = coordinator_browser(make_analyst())

    html = page(client, study, "?evaluation=/etc&dataset=datasets/none")
    download = client.get(
        reverse("studio-study-analysis-download", kwargs={"slug": study.slug}) + "?evaluation=/etc"
    )

    assert "The evaluation must be inside the data folder" in html
    assert "datasets/none is not a complete synthetic dataset" in html
    assert 'id="win-rate-table"' in html  # the analyses still run, without the refused inputs
    assert download.status_code == 400
    assert b"evaluation: The evaluation must be inside the data folder" in download.content


def test_it_applies_the_rules_chosen_in_the_form(study: Study) -> None:
    lenient = expected(study, drop_failed_attention=False)

    html = page(coordinator_browser(make_analyst()), study, "?keep_failed_attention=on")

    assert "Counted 4 of 4 exported participants." in html
    row = next(r for r in lenient.win_rates.rows if r.arm == "fspo")
    assert f"{100 * row.win_rate:.1f}%" in html


def test_it_says_why_a_study_without_participants_has_no_analyses() -> None:
    study = make_simulated_study()
    client = coordinator_browser(make_coordinator())

    html = page(client, study)
    download = client.get(reverse("studio-study-analysis-download", kwargs={"slug": study.slug}))

    assert f"Study &#x27;{study.slug}&#x27; has no participants yet: there is nothing to export." in html
    assert "download-report" not in html
    assert download.status_code == 409


def test_it_keeps_participants_visitors_and_users_without_a_role_out(study: Study, client: Client) -> None:
    url = reverse("studio-study-analysis", kwargs={"slug": study.slug})
    download = reverse("studio-study-analysis-download", kwargs={"slug": study.slug})
    participant = study.participants.first()
    stranger = User.objects.create_user(username="stranger", password="a-long-test-password")

    for path in (url, download):
        assert client.get(path).status_code == 302
        assert browser_of(participant).get(path).url.startswith(reverse("studio-login"))
        assert coordinator_browser(stranger).get(path).status_code == 403


def test_the_dashboard_and_the_analysis_page_give_the_same_figures_for_the_same_ratings(study: Study) -> None:
    simulate_participant(study, Persona(0.6, identical_pair=True), seed=9)  # one cot-vs-base tie
    analysis = expected(study, drop_failed_attention=False, drop_too_fast=False)  # the dashboard's rule

    dashboard = {(w.arm, w.baseline): w for w in study_win_rates(study=study)}

    assert sum(row.ties for row in analysis.win_rates.rows) == 1
    for row in analysis.win_rates.rows:
        live = dashboard[row.arm, row.baseline]
        assert (live.wins, live.n, live.participants) == (row.wins, row.n, row.participants)
        assert (live.rate, live.ci_low, live.ci_high) == (row.win_rate, row.ci_low, row.ci_high)
        assert (live.p_value, live.message) == (row.p_greater, row.message)
    studio = coordinator_browser(make_coordinator())
    dashboard_html = studio.get(reverse("studio-study", kwargs={"slug": study.slug})).content.decode()
    analysis_html = page(studio, study, "?keep_failed_attention=on&too_fast_ms=0")
    for row in analysis.win_rates.rows:
        interval = f"{100 * row.ci_low:.1f}% – {100 * row.ci_high:.1f}%"
        assert interval in dashboard_html and interval in analysis_html


def test_the_dashboard_links_to_the_analyses(study: Study) -> None:
    html = coordinator_browser(make_coordinator()).get(reverse("studio-study", kwargs={"slug": study.slug}))

    assert reverse("studio-study-analysis", kwargs={"slug": study.slug}) in html.content.decode()
