"""`fspo eval`: every arm on the same held-out episodes, judged against the baseline, with a report."""

from __future__ import annotations

import json

import pytest

from modeling.evaluate import Arm, evaluate
from modeling.llm import LLMError
from modeling.train import TrainConfig, train

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "vocab_size": 320}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from modeling.synth import generate_dataset

    root = tmp_path_factory.mktemp("eval")
    ds = generate_dataset(out_dir=root / "ds", domain="elix", users=200, pairs_per_user=8, seed=0).path
    base = root / "base"
    train(
        TrainConfig(
            dataset=str(ds),
            out_dir=str(base),
            stage="pretrain",
            steps=10,
            batch_size=4,
            shots=(0, 2),
            tiny=TINY,
            eval_every=10,
            eval_episodes=4,
            max_prompt_tokens=1024,
        )
    )
    return ds, base


def test_it_writes_the_comparison_table_report_and_plots(setup, tmp_path):
    ds, base = setup
    arms = [
        Arm("base", str(base), "none"),
        Arm("same-as-base", str(base), "none"),
        Arm("few-shot", str(base)),
        Arm("oracle-persona", str(base), "description"),
    ]
    result = evaluate(
        ds,
        arms,
        baseline="base",
        out_dir=tmp_path / "run",
        episodes=6,
        shots=2,
        shot_sweep=[0, 2],
        sweep_arm="few-shot",
        max_new_tokens=12,
    )
    # The same model with the same prompt writes the same greedy answer: every comparison is a tie.
    same = result.row("same-as-base")
    assert same["win_rate"] == 0.5 and same["ties"] == 6
    assert result.row("base")["baseline"] is True
    for r in result.table:
        assert 0 <= r["win_rate"] <= 1 and r["ci_low"] <= r["win_rate"] <= r["ci_high"]
        assert "mean_oracle_score" in r
    assert [r["shots"] for r in result.shot_sweep] == [0, 2]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["table"] == json.loads(json.dumps(result.table)) and saved["judge"] == "oracle"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| few-shot | fewshot |" in report and "Shot-count sensitivity" in report
    for png in ("win_rates.png", "shot_sweep.png"):
        assert (tmp_path / "run" / png).read_bytes()[:4] == b"\x89PNG"
    lines = (tmp_path / "run" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 6 and set(json.loads(lines[0])) >= {"base", "few-shot", "oracle-persona"}


def test_bad_arms_get_clear_errors(setup, tmp_path):
    ds, base = setup
    with pytest.raises(ValueError, match="expected name=path"):
        Arm.parse("just-a-path")
    with pytest.raises(ValueError, match="unknown option 'sideways'"):
        Arm.parse("x=runs/a:sideways")
    assert Arm.parse("o=runs/o:description") == Arm("o", "runs/o", "description", False)
    assert Arm.parse("c=runs/c:cot") == Arm("c", "runs/c", "fewshot", True)
    with pytest.raises(ValueError, match="baseline 'nope' is not one of the arms"):
        evaluate(ds, [Arm("base", str(base), "none")], baseline="nope", out_dir=tmp_path)
    with pytest.raises(LLMError, match=r"cannot load model: .*missing is not a directory"):
        evaluate(
            ds,
            [Arm("base", str(base), "none"), Arm("gone", str(tmp_path / "missing"))],
            baseline="base",
            out_dir=tmp_path / "x",
            episodes=2,
            max_new_tokens=4,
        )
