"""LLM synthesis on the real model: every stage of `fspo synth --llm` against SmolLM2 behind a real
`fspo serve-model`, on the smallest budget that exercises them all (2 users, 2 questions, 2 responses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.modeling.conftest import SMOLLM2_NAME


@pytest.mark.slow
def test_synthesis_against_smollm2_runs_every_stage_and_accounts_for_every_label(smollm2_url, tmp_path):
    out = tmp_path / "elix-llm"
    cmd = [sys.executable, "-m", "modeling.cli", "synth", "--domain", "elix", "--users", "2"]
    cmd += ["--pairs-per-user", "1", "--questions", "2", "--responses-per-question", "2", "--max-rounds", "1"]
    cmd += ["--seed", "0", "--llm", f"{smollm2_url}#{SMOLLM2_NAME}", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    # The judge on a 135M model may decide no pair (its position bias cancels over the two orders): then
    # nothing is published, and the run says so and keeps its report; otherwise the dataset appears.
    report_path = tmp_path / "elix-llm.work" / "report.json"
    if proc.returncode == 0:
        report = json.loads((out / "dataset.json").read_text())["stages"]
        assert report["labels"]["kept"] >= 1
    else:
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "the LLM judge decided no pair" in proc.stderr and not out.exists()
        report = json.loads(report_path.read_text())
        assert report["labels"]["kept"] == 0
    assert report["questions"] == {**report["questions"], "asked": 2, "kept": 2}
    assert report["responses"]["asked"] == 4 and report["responses"]["kept"] == 4
    assert report["personas"]["asked"] == 2 and report["personas"]["kept"] == 2
    labels = report["labels"]
    assert labels["judge_read"] == "probabilities"  # serve-model gives the choices' probabilities
    assert labels["asked"] == 6  # 2 users x 3 candidate pairs each
    assert labels["kept"] + sum(labels["dropped"].values()) == labels["asked"]
