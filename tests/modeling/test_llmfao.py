"""The LLMFAO crowd on the shared data (../shared/data/llmfao, or $FSPO_LLMFAO_DIR): the import's counts
and checks, and the crowd analyses. The data must be there: a missing folder fails, it is never skipped."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modeling.analysis.crowd import (
    CrowdData,
    analyze_crowd,
    crowd_majority,
    inter_worker_agreement,
    krippendorff_nominal,
    load_crowd,
)
from modeling.analysis.crowd_baselines import few_shot_baselines
from modeling.analysis.stats import krippendorff_alpha_nominal
from modeling.cli import main
from modeling.llmfao import CROWD_FILE, ENV_DIR, JUDGE_FILES, LLMFAOError, default_source, import_llmfao

SOURCE = default_source()
RESAMPLES = 40  # enough to check the intervals are there and ordered; the CLI's default is 1,000


def shared_source() -> Path:
    """The shared LLMFAO folder (default_source), or the test fails saying where it looked."""
    source = default_source()
    if not (source / CROWD_FILE).is_file():
        pytest.fail(f"the LLMFAO data is missing at {source}: set {ENV_DIR} to the folder that holds it")
    return source


@pytest.fixture(scope="module")
def source() -> Path:
    return shared_source()


@pytest.fixture(scope="module")
def imported(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llmfao") / "data"
    import_llmfao(source, out)
    return out


@pytest.fixture(scope="module")
def crowd(imported: Path) -> CrowdData:
    return load_crowd(imported)


def small_copy(source: Path, dest: Path, rows: int = 40, *, models: int | None = None) -> Path:
    """The reference files as they are, the crowd's first `rows` judgments (a seeded sample from 100 on)
    and the judges' rows of them. With `models`, instead every judgment between two of the `models` most
    judged models: a slice whose Bradley-Terry fit is not degenerate (a sample of the 59 models is too
    sparse a graph: every score collapses to the solver's floor)."""
    dest.mkdir()
    for name in ("prompts.jsonl", "models.jsonl", "results.jsonl"):
        shutil.copy(source / name, dest / name)
    crowd = pd.read_csv(source / CROWD_FILE)
    if models is not None:
        top = pd.concat([crowd["model_x"], crowd["model_y"]]).value_counts().index[:models]
        crowd = crowd[crowd["model_x"].isin(top) & crowd["model_y"].isin(top)]
    elif rows < 100:
        crowd = crowd.head(rows)
    else:
        crowd = crowd.sample(rows, random_state=0).sort_index()
    crowd.to_csv(dest / CROWD_FILE, index=False)
    for name in JUDGE_FILES.values():
        judged = pd.read_csv(source / name)
        judged[judged["id"].isin(crowd["id"])].to_csv(dest / name, index=False)
    return dest


def edit_csv(path: Path, line: int, **changes: str) -> None:
    """Change fields of the row on `line` (1-based; the header is line 1)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows[line - 2].update(changes)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_the_import_counts_match_the_readme(imported: Path) -> None:
    manifest = json.loads((imported / "dataset.json").read_text())
    report = manifest["import"]
    assert (report["judgments"], report["workers"], report["pairs"], report["prompts"]) == (
        8931,
        124,
        2139,
        13,
    )
    assert report["judge_judgments"] == {"gpt-4": 2139, "gpt-3.5": 2139}
    assert report["skipped"] == [] and report["repeats"] == []
    prefs = pd.read_parquet(imported / "preferences.parquet")
    assert (
        len(prefs) == 8931 and prefs["user_id"].nunique() == 124 and prefs["llmfao_pair_id"].nunique() == 2139
    )
    decisive = prefs[~prefs["tie"]].groupby("user_id").size()
    assert (decisive >= 8).sum() == 88 and (decisive >= 16).sum() == 62


def test_ties_are_kept_and_marked_and_responses_carry_their_texts(imported: Path) -> None:
    prefs = pd.read_parquet(imported / "preferences.parquet")
    assert prefs["tie"].sum() == (prefs["winner"] == "tie").sum() == 3471
    responses = pd.read_parquet(imported / "responses.parquet").set_index("response_id")
    left_wins = prefs[prefs["winner"] == "left"]
    assert (left_wins["chosen_id"] == left_wins["left_id"]).all()
    assert responses.loc[prefs["chosen_id"], "text"].notna().all()
    report = json.loads((imported / "dataset.json").read_text())["import"]
    assert report["empty_responses"] == 52 and report["judgments_of_empty"] == 1208  # kept, and counted
    assert (
        responses.loc[prefs["left_id"], "question_id"].to_numpy() == prefs["question_id"].to_numpy()
    ).all()


def test_the_manifest_carries_the_license_and_attribution(imported: Path) -> None:
    manifest = json.loads((imported / "dataset.json").read_text())
    assert manifest["license"] == "CC BY 4.0"
    assert "Ustalov" in manifest["attribution"] and "llmonitor.com" in manifest["attribution"]
    assert manifest["backend"] == "imported:llmfao" and manifest["complete"]


def test_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LLMFAOError, match="no such folder"):
        import_llmfao(tmp_path / "nowhere", tmp_path / "out")


def test_unknown_model_and_prompt_ids_are_errors_and_nothing_is_written(source: Path, tmp_path: Path) -> None:
    src = small_copy(source, tmp_path / "src")
    edit_csv(src / CROWD_FILE, 3, model_x="9999")
    with pytest.raises(LLMFAOError, match="line 3: unknown model 9999"):
        import_llmfao(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    src = small_copy(source, tmp_path / "src2")
    edit_csv(src / CROWD_FILE, 5, prompt="77")
    with pytest.raises(LLMFAOError, match="line 5: unknown prompt 77"):
        import_llmfao(src, tmp_path / "out")


def test_a_judges_duplicate_judgment_id_is_an_error(source: Path, tmp_path: Path) -> None:
    src = small_copy(source, tmp_path / "src")
    path = src / JUDGE_FILES["gpt-4"]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(LLMFAOError, match="duplicate judgment id"):
        import_llmfao(src, tmp_path / "out")


def test_broken_rows_are_skipped_and_listed_with_their_lines(source: Path, tmp_path: Path) -> None:
    src = small_copy(source, tmp_path / "src")
    edit_csv(src / CROWD_FILE, 2, winner="maybe")
    edit_csv(src / CROWD_FILE, 4, worker="")
    report = import_llmfao(src, tmp_path / "out")
    assert [(s.file, s.line) for s in report.skipped] == [(CROWD_FILE, 2), (CROWD_FILE, 4)]
    assert "winner 'maybe'" in report.skipped[0].reason
    assert report.judgments == 38
    listed = json.loads((tmp_path / "out" / "dataset.json").read_text())["import"]["skipped"]
    assert len(listed) == 2


def test_a_worker_judging_a_pair_twice_is_a_kept_consistency_repeat(source: Path, tmp_path: Path) -> None:
    src = small_copy(source, tmp_path / "src")
    rows = pd.read_csv(src / CROWD_FILE)
    again = rows.iloc[[2]].assign(winner="tie" if rows.iloc[2]["winner"] != "tie" else "left")
    pd.concat([rows, again]).to_csv(src / CROWD_FILE, index=False)
    report = import_llmfao(src, tmp_path / "out")
    assert report.judgments == 41
    assert report.repeats == [
        {"judgment": 40, "repeat_of": 2, "worker": int(rows.iloc[2]["worker"]), "agree": 0}
    ]
    data = load_crowd(tmp_path / "out")
    consistency = analyze_crowd(data, resamples=RESAMPLES).consistency
    assert (consistency.repeats, consistency.agree, consistency.agreement) == (1, 0, 0.0)


def tiny_crowd(labels: dict[str, list[str]]) -> CrowdData:
    """Workers' labels ("lo", "hi", "tie", or "" for not judged) of units 0..n-1."""
    rows = [
        {"worker": w, "unit": f"u{u}", "label": v}
        for w, values in labels.items()
        for u, v in enumerate(values)
        if v
    ]
    frame = pd.DataFrame(rows).assign(
        judgment=lambda d: range(len(d)), question_id=0, left_id=0, right_id=1, repeat_of=np.nan
    )
    return CrowdData(frame, pd.DataFrame(columns=["judge", "unit", "label"]), {0: "a", 1: "b"}, {})


def test_agreement_on_a_hand_made_table_matches_the_hand_computation() -> None:
    data = tiny_crowd({"A": ["lo", "lo", "hi", "hi"], "B": ["lo", "lo", "hi", "lo"]})
    # Coincidences: lo-lo 4, hi-hi 2, lo-hi 1 + hi-lo 1; n_lo 5, n_hi 3, n 8:
    # alpha = 1 - (n - 1) * 2 / (2 * n_lo * n_hi) = 1 - 7 * 2 / 30.
    assert krippendorff_nominal(data.judgments) == pytest.approx(1 - 14 / 30)
    assert krippendorff_alpha_nominal(
        [["lo", "lo"], ["lo", "lo"], ["hi", "hi"], ["hi", "lo"]]
    ) == pytest.approx(1 - 14 / 30)
    # Kappa: p_o 3/4, p_e 1/2 * 3/4 + 1/2 * 1/4 = 1/2, so (3/4 - 1/2) / (1/2) = 1/2.
    agreement = inter_worker_agreement(data, min_shared=4)
    assert agreement.kappa_mean == pytest.approx(0.5) and agreement.kappa_pairs == 1
    assert agreement.observed_agreement == pytest.approx(0.75)


def test_ties_dropped_are_missing_values_and_a_split_crowd_says_tie() -> None:
    data = tiny_crowd(
        {"A": ["lo", "tie", "hi", "lo"], "B": ["lo", "lo", "hi", "hi"], "C": ["lo", "lo", "", "tie"]}
    )
    # Ties dropped: units (lo, lo, lo), (lo, lo), (hi, hi), (lo, hi).
    expected = krippendorff_alpha_nominal([["lo"] * 3, ["lo"] * 2, ["hi"] * 2, ["lo", "hi"]])
    assert krippendorff_nominal(data.judgments, drop_ties=True) == pytest.approx(expected)
    majority = crowd_majority(data)
    assert majority["verdict"].to_dict() == {"u0": "lo", "u1": "lo", "u2": "hi", "u3": "tie"}
    assert majority["split"].to_dict() == {"u0": False, "u1": False, "u2": False, "u3": True}


def test_the_crowd_analyses_give_finite_numbers_in_range(crowd: CrowdData) -> None:
    a = analyze_crowd(crowd, resamples=RESAMPLES)
    for value in (a.agreement.alpha_with_ties, a.agreement.alpha_ties_dropped, a.agreement.kappa_mean):
        assert value is not None and -1 <= value <= 1
    assert a.agreement.units == 2124 and a.agreement.kappa_pairs > 0
    assert a.consistency.repeats == 0 and a.consistency.message
    assert [j.judge for j in a.judges] == ["gpt-4", "gpt-3.5"]
    for j in a.judges:
        assert j.pairs == 2139 and 0 <= j.agreement <= 1 and j.kappa is not None
        assert j.kappa_ci is not None and j.kappa_ci[0] <= j.kappa <= j.kappa_ci[1]
    r = a.ranking
    assert len(r.models) == 59 and r.crowd == sorted(r.crowd, reverse=True)
    assert all(low <= s <= high for s, low, high in zip(r.crowd, r.crowd_low, r.crowd_high, strict=True))
    assert all(rho is not None and math.isfinite(rho) and -1 <= rho <= 1 for rho in r.spearman.values())


def test_the_few_shot_baselines_cover_the_eligible_workers(crowd: CrowdData) -> None:
    b = few_shot_baselines(crowd, resamples=RESAMPLES)
    assert b.eligible_workers == 88
    assert [(r.shots, r.baseline.split()[0]) for r in b.rows][:2] == [(0, "crowd"), (0, "position/length")]
    for r in b.rows:
        assert r.accuracy is not None and 0 <= r.accuracy <= 1 and r.ci is not None
    prior_at_zero = next(r for r in b.rows if r.shots == 0 and r.baseline.startswith("position"))
    assert prior_at_zero.accuracy == 0.5  # no shots: no leaning, every prediction half right


def test_the_commands_write_the_dataset_and_the_report(source: Path, tmp_path: Path) -> None:
    src = small_copy(source, tmp_path / "src", rows=400)
    assert main(["data", "import", "llmfao", str(src), "--out", str(tmp_path / "data")]) == 0
    argv = ["analyze", "crowd", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--resamples", "20"]
    assert main(argv) == 0
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"report.md", "crowd.json", "crowd-agreement.png", "crowd-ranking.png"} <= names
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Krippendorff's alpha" in report and "CC BY 4.0" in report
    assert json.loads((tmp_path / "run" / "crowd.json").read_text())["format"] == "fspo-crowd-analysis/1"
    assert main(["data", "import", "llmfao", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
