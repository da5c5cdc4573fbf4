"""`fspo analyze crowd --judge`: the project's LLM judge against the crowd, its plumbing checked with the
tiny model on a few pairs of a slice of the shared LLMFAO data (its verdicts mean nothing)."""

import json
from pathlib import Path

import pytest

from modeling.analysis.crowd import load_crowd
from modeling.analysis.crowd_judge import crowd_texts, llm_judge_agreement, llm_judge_rows, sample_pairs
from modeling.cli import main
from modeling.judges import LLMJudge
from modeling.llm import backend_from_spec
from modeling.llmfao import import_llmfao
from tests.modeling.test_llmfao import shared_source, small_copy

PAIRS = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = shared_source()
    root = tmp_path_factory.mktemp("crowd-judge")
    out = root / "data"
    import_llmfao(small_copy(source, root / "source", rows=40), out)
    return out


def test_the_sample_of_pairs_is_seeded_and_of_distinct_pairs(dataset: Path) -> None:
    data = load_crowd(dataset)
    first, again = sample_pairs(data, pairs=PAIRS, seed=3), sample_pairs(data, pairs=PAIRS, seed=3)
    assert first.equals(again)
    assert first["unit"].is_unique and len(first) == PAIRS
    assert (first["lo"] < first["hi"]).all()


def test_the_llm_judge_gives_one_verdict_per_sampled_pair_and_its_kappa_against_the_crowd(
    dataset: Path, tiny_model_dir: Path
) -> None:
    data = load_crowd(dataset)
    questions, responses = crowd_texts(dataset)
    judge = LLMJudge(backend_from_spec(str(tiny_model_dir)))

    rows = llm_judge_rows(data, judge, questions=questions, responses=responses, pairs=PAIRS)
    result = llm_judge_agreement(data, rows, resamples=20)

    assert len(rows) == PAIRS and set(rows["label"]) <= {"lo", "hi", "tie"}
    assert result.pairs == PAIRS and 0 <= result.agreement <= 1


def test_fspo_analyze_crowd_with_a_judge_reports_it_beside_the_gpt_judges(
    dataset: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    argv = ["analyze", "crowd", str(dataset), "--out", str(tmp_path), "--no-baselines", "--resamples", "20"]
    assert main([*argv, "--judge", str(tiny_model_dir), "--judge-pairs", str(PAIRS)]) == 0

    judges = json.loads((tmp_path / "crowd.json").read_text())["judges"]
    assert [j["judge"] for j in judges] == ["gpt-4", "gpt-3.5", f"llm:{tiny_model_dir}"]
    assert judges[-1]["pairs"] == PAIRS
    assert f"llm:{tiny_model_dir}" in (tmp_path / "report.md").read_text()
