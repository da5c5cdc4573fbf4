"""`fspo synth` and `fspo synth stats` as a user runs them: a subprocess, its output and exit code."""

from __future__ import annotations

import json
import subprocess
import sys

from modeling.synth import load_dataset
from tests.modeling.conftest import REPO_ROOT


def fspo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modeling.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_it_writes_a_dataset_and_prints_its_stats(tmp_path):
    out = tmp_path / "rp"
    proc = fspo("synth", "--domain", "roleplay", "--users", "300", "--pairs-per-user", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "1,200 pairs, 300 users" in proc.stdout
    assert "pairs" in proc.stderr  # the progress bar
    assert load_dataset(out).manifest["counts"]["preferences"] == 1200

    stats = fspo("synth", "stats", str(out), "--no-embeddings")
    assert stats.returncode == 0, stats.stderr
    for row in (
        "order-swap agreement",
        "repeat agreement",
        "transitivity violations",
        "preference-combo entropy",
    ):
        assert row in stats.stdout
    as_json = json.loads(fspo("synth", "stats", str(out), "--no-embeddings", "--json").stdout)
    assert as_json[0]["sizes"]["preferences"] == 1200
    assert 0.5 < as_json[0]["consistency"]["order_swap_agreement_final"] <= 1


def test_bad_input_gets_one_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntraits: [unclosed\n")
    proc = fspo("synth", "--domain", str(bad), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: domain file") and "not valid YAML" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()

    ok = tmp_path / "ok"
    assert fspo("synth", "--users", "50", "--pairs-per-user", "2", "--out", str(ok)).returncode == 0
    f = ok / "users.parquet"
    f.write_bytes(f.read_bytes()[:100])
    proc = fspo("synth", "stats", str(ok), "--no-embeddings")
    assert proc.returncode == 2
    assert "users.parquet: cannot read" in proc.stderr and "truncated or corrupt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    proc = fspo("synth", "--users", "0")
    assert proc.returncode == 2 and "users must be >= 1" in proc.stderr


def test_it_draws_users_from_a_structure_mix_and_refuses_an_unknown_structure(tmp_path):
    out = tmp_path / "mix"
    args = ("synth", "--users", "200", "--pairs-per-user", "3", "--out", str(out))
    proc = fspo(*args, "--structures", "weighted=2,bimodal=1,topical=1", "--held-out-structures", "bimodal")
    assert proc.returncode == 0, proc.stderr
    users = load_dataset(out).table("users").to_pandas()
    assert set(users.structure) == {"weighted", "bimodal", "topical"}
    assert (users[users.structure == "bimodal"].split == "test").all()
    proc = fspo(*args, "--overwrite", "--structures", "weighted=1,zigzag=1")
    assert proc.returncode == 2 and "unknown preference structures ['zigzag']" in proc.stderr
    assert "Traceback" not in proc.stderr
