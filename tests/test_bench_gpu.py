"""``bench/bench_gpu.py --smoke``: the GPU bench's every step (the random model, both training peers
through bench_train, generation through bench_generate, the tables) at tiny sizes on the CPU, so the
script a GPU host runs is known to work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~50 s on 2 shared cores: two training peers and four generation runs, each a process
def test_the_gpu_bench_runs_end_to_end_at_smoke_sizes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "bench/bench_gpu.py", "--smoke", "--work", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| 2 |")]
    assert [cells[1].strip() for cells in rows] == ["ours", "trl"]
    assert all(float(cells[3]) > 0 for cells in rows)  # pairs/s of each peer
    assert "replies equal with and without prefix reuse" in proc.stdout
