"""`manage.py import_llmfao`: a slice of the shared LLMFAO data (../shared/data/llmfao, or $FSPO_LLMFAO_DIR)
loaded into a study as imported judgments; the analysis page and the exports run on it unchanged."""

import json
from dataclasses import replace
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from annotation.models import GeneratedResponse, Rating, RatingItem
from modeling.analysis import ExclusionRules, human_win_rates, load_export, select_participants
from modeling.analysis.winrates import counted_ratings
from modeling.llmfao import ATTRIBUTION, ENV_DIR, import_llmfao
from studyapp.models import Participant, Study
from tests.factories import make_analyst, make_coordinator, make_study
from tests.modeling.test_llmfao import shared_source, small_copy
from tests.support import coordinator_browser

pytestmark = pytest.mark.django_db
ROWS = 120  # a seeded sample of the crowd's judgments: several workers, ties and decisive ones


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = shared_source()
    folder = tmp_path_factory.mktemp("llmfao-site")
    out = folder / "data"
    import_llmfao(small_copy(source, folder / "source", rows=ROWS), out)
    return out


def crowd(dataset: Path) -> pd.DataFrame:
    return pd.read_parquet(dataset / "preferences.parquet")


def run(dataset: Path, slug: str = "llmfao-crowd", **options: object) -> str:
    out = StringIO()
    call_command("import_llmfao", str(dataset), study=slug, stdout=out, **options)
    return out.getvalue()


def counts() -> tuple[int, ...]:
    return (
        Study.objects.count(),
        Participant.objects.count(),
        GeneratedResponse.objects.count(),
        RatingItem.objects.count(),
        Rating.objects.count(),
    )


def test_every_worker_becomes_a_completed_imported_participant_and_every_judgment_an_item(
    dataset: Path,
) -> None:
    prefs = crowd(dataset)

    run(dataset, min_pair_judgments=1)

    study = Study.objects.get(slug="llmfao-crowd")
    participants = study.participants.all()
    assert participants.count() == prefs["user_id"].nunique()
    assert {(p.state, p.place, p.consented_at, p.recruitment_session_id) for p in participants} == {
        ("completed", None, None, "imported")
    }
    assert RatingItem.objects.filter(participant__study=study).count() == len(prefs)
    assert Rating.objects.filter(item__participant__study=study).count() == int((~prefs["tie"]).sum())
    assert study.arms.count() == pd.read_parquet(dataset / "responses.parquet")["model_name"].nunique()
    assert study.comparisons.exists() and not study.is_open


def test_a_rating_keeps_the_side_the_worker_chose(dataset: Path) -> None:
    prefs = crowd(dataset)
    run(dataset)
    decided = prefs[~prefs["tie"]]
    chosen = sorted(decided["winner"].value_counts().items())
    stored = Rating.objects.values_list("choice", flat=True)
    assert sorted(pd.Series(list(stored)).value_counts().items()) == chosen


def test_importing_the_same_files_again_changes_nothing(dataset: Path) -> None:
    run(dataset)
    before = counts()

    out = run(dataset)

    assert "nothing changed" in out
    assert counts() == before


def test_a_slug_another_study_holds_is_refused_and_nothing_is_written(dataset: Path) -> None:
    make_study(slug="taken")
    before = counts()

    with pytest.raises(CommandError, match="exists already"):
        run(dataset, slug="taken")

    assert counts() == before


def test_a_folder_that_is_not_an_llmfao_import_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    before = counts()

    with pytest.raises(CommandError, match="nothing was written"):
        run(tmp_path / "missing")

    assert counts() == before


def test_the_analysis_page_and_the_study_export_show_the_attribution(dataset: Path) -> None:
    run(dataset)
    client: Client = coordinator_browser(make_coordinator())

    page = client.get(reverse("studio-study-analysis", kwargs={"slug": "llmfao-crowd"}))
    export = client.get(
        reverse("api-study-export-table", kwargs={"slug": "llmfao-crowd", "table": "study", "fmt": "csv"})
    )
    judgments = client.get(
        reverse("api-study-export-table", kwargs={"slug": "llmfao-crowd", "table": "judgments", "fmt": "csv"})
    )

    assert page.status_code == 200 and export.status_code == 200 and judgments.status_code == 200
    assert ATTRIBUTION.split(",")[0] in page.content.decode()
    assert ATTRIBUTION.split(",")[0] in b"".join(export.streaming_content).decode()


def test_an_export_of_the_study_carries_the_attribution_in_its_manifest(
    dataset: Path, tmp_path: Path
) -> None:
    run(dataset)

    call_command("export", "llmfao-crowd", format="csv", out=tmp_path / "export", stdout=StringIO())

    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["imported_from"] == Study.objects.get(slug="llmfao-crowd").instructions_text
    assert ATTRIBUTION in manifest["imported_from"]


def test_the_exported_judgments_hold_the_ties_marked_and_no_win_rate_counts_them(
    dataset: Path, tmp_path: Path
) -> None:
    prefs = crowd(dataset)
    run(dataset, min_pair_judgments=1)
    call_command("export", "llmfao-crowd", format="csv", out=tmp_path / "export", stdout=StringIO())

    data = load_export(tmp_path / "export")
    j = data.judgments
    ties = j[j["kind"] == "tie"]
    assert len(ties) == int(prefs["tie"].sum()) > 0
    assert len(j[j["kind"] == "rating"]) == int((~prefs["tie"]).sum())
    assert (
        ties["chosen_side"].isna().all() and ties["arm_won"].isna().all() and ties["chosen_arm"].isna().all()
    )
    assert ties[["left_response_id", "right_response_id", "left_arm", "right_arm"]].notna().all().all()
    # Each worker's ratings and ties are their A/B items, in place: positions 0..n-1 with none missing.
    for _, mine in j.groupby("participant"):
        assert sorted(mine["position"]) == list(range(len(mine)))

    selection = select_participants(data, ExclusionRules())
    counted, _ = counted_ratings(data, selection)
    without = replace(data, judgments=j[j["kind"] != "tie"].reset_index(drop=True))
    assert set(counted["kind"]) == {"rating"} and len(counted) > 0
    assert [(w.arm, w.baseline, w.n, w.wins) for w in human_win_rates(data, selection).rows] == [
        (w.arm, w.baseline, w.n, w.wins) for w in human_win_rates(without, selection).rows
    ]


def test_the_studio_button_imports_the_crowd_in_one_click(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_DIR, str(dataset.parent / "source"))
    client: Client = coordinator_browser(make_coordinator())
    assert reverse("studio-import-llmfao") in client.get(reverse("studio-home")).content.decode()

    page = client.post(reverse("studio-import-llmfao"), follow=True)

    study = Study.objects.get(slug="llmfao-crowd")
    assert page.redirect_chain[-1][0] == reverse("studio-study", kwargs={"slug": study.slug})
    assert f"{crowd(dataset)['user_id'].nunique()} workers, {ROWS} judgments" in page.content.decode()
    assert study.participants.count() == crowd(dataset)["user_id"].nunique()
    again = client.post(reverse("studio-import-llmfao"), follow=True)
    assert "holds this import already" in again.content.decode() and Study.objects.count() == 1


def test_the_studio_button_says_clearly_when_the_data_is_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "nowhere"))
    client: Client = coordinator_browser(make_coordinator())

    page = client.post(reverse("studio-import-llmfao"), follow=True)

    assert page.redirect_chain[-1][0] == reverse("studio-home")
    text = page.content.decode()
    assert "could not be imported" in text and "no such folder" in text and "Nothing was written" in text
    assert not Study.objects.exists()


def test_an_analyst_cannot_import_and_sees_no_button(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DIR, str(dataset.parent / "source"))
    analyst: Client = coordinator_browser(make_analyst())

    assert reverse("studio-import-llmfao") not in analyst.get(reverse("studio-home")).content.decode()
    assert analyst.post(reverse("studio-import-llmfao")).status_code == 403
    assert not Study.objects.exists()
