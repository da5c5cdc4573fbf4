"""`fspo eval` on a model whose context is shorter than its few-shot prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from modeling.evaluate import Arm, evaluate


def test_eval_reports_how_many_shots_each_arm_cut_to_fit_the_context(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from modeling.synth import generate_dataset

    ds = generate_dataset(out_dir=tmp_path / "ds", domain="elix", users=60, pairs_per_user=8, seed=0).path
    short = tmp_path / "short-context"
    shutil.copytree(tiny_model_dir, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 600}))
    arms = [Arm("base", str(short), "none"), Arm("few-shot", str(short))]

    result = evaluate(
        ds, arms, baseline="base", out_dir=tmp_path / "run", episodes=3, shots=4, max_new_tokens=4
    )

    few_shot, base = result.row("few-shot"), result.row("base")
    assert (base["prompts_cut"], base["shots_cut"]) == (0, 0)
    assert few_shot["prompts_cut"] == 3 and 3 <= few_shot["shots_cut"] <= 12
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["shots_cut"] for r in saved["table"]] == [0, few_shot["shots_cut"]]
    assert (
        f"`few-shot` 3 prompts ({few_shot['shots_cut']} shots)"
        in (tmp_path / "run" / "report.md").read_text()
    )
