"""The few-shot table's model rows (`fspo analyze crowd --model-arms`), their plumbing checked with the tiny
model (a random LoRA adapter as the "FSPO" policy, the tiny model as its reference and base) on three
workers of the shared LLMFAO data: the numbers mean nothing, the splits, inputs and rows are checked."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from modeling.analysis.crowd import AnalysisInputError, load_crowd
from modeling.analysis.crowd_baselines import BASELINES, decisive_judgments, eligible_workers, few_shot_folds
from modeling.analysis.crowd_judge import crowd_texts
from modeling.analysis.crowd_models import (
    BASE_OWN,
    FSPO_OTHER,
    FSPO_OWN,
    MODEL_ROWS,
    ModelArms,
    cut_responses,
    fold_episodes,
    model_arms_from_checkpoint,
    model_rows,
    row_margins,
    sample_folds,
)
from modeling.cli import main
from modeling.data import PROMPT_FORMAT_VERSION
from modeling.llmfao import CROWD_FILE, JUDGE_FILES, import_llmfao
from modeling.train import MANIFEST
from tests.modeling.test_llmfao import shared_source

SHOTS = (0, 1, 2)
BOUNDS = {"workers": 3, "folds": 1, "targets": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three workers with the most non-tie judgments, all their judgments, imported."""
    source = shared_source()
    root = tmp_path_factory.mktemp("crowd-models")
    copy = root / "source"
    copy.mkdir()
    for name in ("prompts.jsonl", "models.jsonl", "results.jsonl"):
        shutil.copy(source / name, copy / name)
    crowd = pd.read_csv(source / CROWD_FILE)
    top = crowd[crowd["winner"] != "tie"]["worker"].value_counts().index[:3]
    crowd = crowd[crowd["worker"].isin(top)]
    crowd.to_csv(copy / CROWD_FILE, index=False)
    for name in JUDGE_FILES.values():
        judged = pd.read_csv(source / name)
        judged[judged["id"].isin(crowd["id"])].to_csv(copy / name, index=False)
    import_llmfao(copy, root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def policy_dir(tiny_model_dir: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random LoRA adapter with the tiny model's tokenizer beside it, as `fspo train --lora` saves one."""
    out = tmp_path_factory.mktemp("policy") / "fspo"
    shutil.copytree(lora_dir, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def arms(tiny_model_dir: Path, policy_dir: Path) -> ModelArms:
    return ModelArms(
        policy=str(policy_dir), reference=str(tiny_model_dir), base=str(tiny_model_dir), beta=0.1
    )


def test_the_sampled_folds_are_the_baselines_folds_with_the_same_shots(dataset: Path) -> None:
    decisive = decisive_judgments(load_crowd(dataset))
    sampled = sample_folds(decisive, shots=SHOTS, seed=0, **BOUNDS)

    for k in SHOTS:
        baseline_folds = few_shot_folds(decisive, eligible_workers(decisive), k, seed=0)
        at_k = [s for s in sampled if s.fold.k == k]
        assert len(at_k) == BOUNDS["workers"]  # one held-out prompt for each of the three workers
        assert all(s.fold in baseline_folds for s in at_k)
        assert all(set(s.targets) <= set(s.fold.targets) and len(s.targets) <= 2 for s in at_k)


def test_another_workers_shots_differ_from_the_own_and_keep_off_the_held_out_prompt(dataset: Path) -> None:
    decisive = decisive_judgments(load_crowd(dataset))
    sampled = sample_folds(decisive, shots=SHOTS, seed=0, **BOUNDS)
    questions, responses = crowd_texts(dataset)
    own, other = fold_episodes(decisive, sampled, questions=questions, responses=responses)

    ks = [s.fold.k for s in sampled for _ in s.targets]
    assert len(own) == len(other) == len(ks)
    for k, a, b in zip(ks, own, other, strict=True):
        assert (a.question, a.chosen, a.rejected) == (b.question, b.chosen, b.rejected)
        assert len(a.shots) == len(b.shots) == k
        assert (a.shots != b.shots) == (k > 0)
        assert all(p.question != a.question for p in a.shots + b.shots)
    for s in sampled:
        assert s.other_worker != s.fold.worker
        assert set(decisive.loc[list(s.other_shots), "worker"]) <= {s.other_worker}


def test_own_and_other_shots_give_the_model_different_scores_only_when_there_are_shots(
    dataset: Path, arms: ModelArms
) -> None:
    decisive = decisive_judgments(load_crowd(dataset))
    sampled = sample_folds(decisive, shots=SHOTS, seed=0, **BOUNDS)
    questions, responses = crowd_texts(dataset)
    tok = AutoTokenizer.from_pretrained(arms.base)
    cut = cut_responses(responses, tok, 16)
    own, other = fold_episodes(decisive, sampled, questions=questions, responses=cut)

    margins = row_margins(arms, own, other, str(dataset), 16, None)

    ks = np.array([s.fold.k for s in sampled for _ in s.targets])
    gap = np.abs(margins[FSPO_OWN] - margins[FSPO_OTHER])
    assert np.all(gap[ks == 0] < 1e-4) and np.all(gap[ks > 0] > 1e-4)
    assert all(np.isfinite(m).all() and len(m) == len(own) for m in margins.values())


def test_the_table_has_every_row_at_every_k_on_the_same_targets(dataset: Path, arms: ModelArms) -> None:
    table = model_rows(
        load_crowd(dataset), dataset, arms, shots=SHOTS, response_tokens=16, resamples=20, **BOUNDS
    )

    assert [(r.shots, r.baseline) for r in table.rows] == [
        (k, name) for k in SHOTS for name in (*BASELINES, *MODEL_ROWS)
    ]
    for k in SHOTS:
        at_k = [r for r in table.rows if r.shots == k]
        assert len({(r.workers, r.targets) for r in at_k}) == 1 and at_k[0].targets > 0
        assert all(r.accuracy is not None and 0 <= r.accuracy <= 1 for r in at_k)


def test_without_an_fspo_checkpoint_only_the_base_models_row_is_run(
    dataset: Path, tiny_model_dir: Path
) -> None:
    arms = ModelArms(policy=None, reference=None, base=str(tiny_model_dir), beta=None)

    table = model_rows(
        load_crowd(dataset), dataset, arms, shots=(0, 1), response_tokens=8, resamples=20, **BOUNDS
    )

    assert [(r.shots, r.baseline) for r in table.rows] == [
        (k, name) for k in (0, 1) for name in (*BASELINES, BASE_OWN)
    ]


def test_a_checkpoint_that_is_not_a_preference_stage_is_a_clear_error(tiny_model_dir: Path) -> None:
    with pytest.raises(AnalysisInputError, match="no fspo.json"):
        model_arms_from_checkpoint(tiny_model_dir)


def test_fspo_analyze_crowd_with_model_arms_writes_the_rows(
    dataset: Path, tiny_model_dir: Path, policy_dir: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "fspo"
    shutil.copytree(policy_dir, checkpoint)
    manifest = {"prompt_format_version": PROMPT_FORMAT_VERSION, "config": {"stage": "ipo", "beta": 0.1}}
    manifest["config"]["init"] = str(tiny_model_dir)  # a plain model: the reference is also the base
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    argv = ["analyze", "crowd", str(dataset), "--out", str(tmp_path / "out"), "--resamples", "20"]
    argv += ["--model-arms", str(checkpoint), "--model-workers", "2", "--model-targets", "1"]

    assert main([*argv, "--model-response-tokens", "8"]) == 0

    models = json.loads((tmp_path / "out" / "crowd.json").read_text())["models"]
    assert models["arms"]["reference"] == models["arms"]["base"] == str(tiny_model_dir)
    assert {r["baseline"] for r in models["rows"]} == {*BASELINES, *MODEL_ROWS}
    assert "the model rows" in (tmp_path / "out" / "report.md").read_text()
