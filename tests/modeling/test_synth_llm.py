"""The LLM data engine end to end against `fspo serve-model` on loopback with a tiny real model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from modeling.llm import LLMError, OpenAICompatBackend
from modeling.synth import DatasetError, load_dataset
from modeling.synth.llm_pipeline import generate_with_llm, parse_choice
from tests.modeling.conftest import REPO_ROOT, ScriptedServer, free_port, serve_model

SMALL = dict(
    domain="roleplay",
    users=5,
    pairs_per_user=2,
    questions=6,
    responses_per_question=3,
    max_rounds=2,
    judge_temperature=1.0,
)


@pytest.fixture(scope="module")
def llm_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_model(
        tiny_model_dir, tmp_path_factory.mktemp("serve") / "serve.log", "--served-name", "tiny"
    ) as url:
        yield url


def test_it_writes_a_complete_dataset_through_the_http_path(llm_url, tmp_path):
    info = generate_with_llm(llm=f"{llm_url}#tiny", out_dir=tmp_path / "d", **SMALL)
    ds = load_dataset(info.path)
    assert ds.manifest["backend"] == f"llm:{llm_url}#tiny"
    assert ds.manifest["prompts_version"] == 1
    counts = ds.manifest["counts"]
    assert counts["users"] == 5 and counts["questions"] == 6 and counts["responses"] == 18
    assert 1 <= counts["preferences"] <= 10
    prefs = pq.read_table(info.path / "preferences.parquet").to_pandas()
    resp = pq.read_table(info.path / "responses.parquet").to_pandas().set_index("response_id")
    assert prefs.margin.isna().all()  # no oracle behind an LLM judge
    assert (resp.loc[prefs.chosen_id, "question_id"].to_numpy() == prefs.question_id.to_numpy()).all()
    assert (resp.source == f"llm:{llm_url}#tiny").all()
    users = pq.read_table(info.path / "users.parquet").to_pandas()
    # users whose pairs the judge could not decide were refined: their persona grew by a sentence a round
    refined = users[users.refinement_rounds > 0]
    assert len(refined) > 0
    assert (refined.description.str.len() > refined.description_initial.str.len()).all()
    q = ds.manifest["quality"]
    assert len(q["order_swap_agreement_by_round"]) == 3
    assert sum(q["refinement_rounds_histogram"]) == 5
    assert ds.manifest["llm_calls"]["made"] > 0 and ds.manifest["llm_calls"]["reused_from_journal"] == 0
    assert not (tmp_path / "d.work").exists()  # the journal goes once the dataset is published


def test_an_interrupted_run_resumes_without_redoing_finished_calls(llm_url, tmp_path):
    out = tmp_path / "d"
    seen: list[str] = []

    def stop_during_labels(done: int, total: int, stage: str) -> None:
        seen.append(stage)
        if stage.startswith("labels") and done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_with_llm(llm=f"{llm_url}#tiny", out_dir=out, progress=stop_during_labels, **SMALL)
    assert not out.exists()
    with pytest.raises(DatasetError, match="no such dataset"):
        load_dataset(out)
    journal = (tmp_path / "d.work" / "calls.jsonl").read_text().splitlines()
    finished = {json.loads(line)["k"] for line in journal}
    assert any(k.startswith("L") for k in finished)  # some labels were done before the interruption

    info = generate_with_llm(llm=f"{llm_url}#tiny", out_dir=out, **SMALL)
    calls = info.manifest["llm_calls"]
    assert calls["reused_from_journal"] == len(finished)
    assert calls["made"] > 0
    # A run with other options does not silently reuse another run's journal.
    (tmp_path / "d2.work").mkdir()
    (tmp_path / "d2.work" / "fingerprint").write_text("something else")
    with pytest.raises(DatasetError, match="interrupted run with other options"):
        generate_with_llm(llm=f"{llm_url}#tiny", out_dir=tmp_path / "d2", **SMALL)


def test_an_unreachable_endpoint_fails_in_one_line_and_writes_nothing(tmp_path):
    backend = OpenAICompatBackend(f"http://127.0.0.1:{free_port()}/v1", "tiny", max_retries=1, backoff_s=0.05)
    with pytest.raises(LLMError, match=r"cannot reach LLM endpoint http://127\.0\.0\.1:\d+/v1") as err:
        generate_with_llm(llm=backend, out_dir=tmp_path / "d", **SMALL)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.partial").exists()


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ([(500, b"internal error")], r"failed with HTTP 500: internal error \(gave up after 2 attempts\)"),
        ([(200, b"<html>not json</html>")], r"returned a malformed response"),
        ([(200, b'{"choices": []}')], r"returned a malformed response"),
    ],
)
def test_a_misbehaving_endpoint_fails_in_one_line_and_writes_nothing(tmp_path, script, message):
    with ScriptedServer(script) as server:
        backend = OpenAICompatBackend(server.url, "m", max_retries=1, backoff_s=0.01)
        with pytest.raises(LLMError, match=message) as err:
            generate_with_llm(llm=backend, out_dir=tmp_path / "d", **SMALL)
        assert server.hits >= 2  # it retried before giving up
    assert "\n" not in str(err.value)
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.partial").exists()


def test_an_unknown_model_name_on_the_server_fails_clearly(llm_url, tmp_path):
    with pytest.raises(LLMError, match="nope"):
        generate_with_llm(llm=f"{llm_url}#nope", out_dir=tmp_path / "d", **SMALL)
    assert not (tmp_path / "d").exists()


def test_the_cli_reports_a_bad_endpoint_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeling.cli",
            "synth",
            "--domain",
            "elix",
            "--users",
            "2",
            "--pairs-per-user",
            "1",
            "--llm",
            f"http://127.0.0.1:{free_port()}/v1",
            "--out",
            str(tmp_path / "d"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "needs the model name after '#'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("reply", "want"),
    [("A", "A"), (" b", "B"), ("Response B.", "B"), ("A or B", None), ("neither", None), ("", None)],
)
def test_it_parses_the_judges_answer(reply, want):
    assert parse_choice(reply) == want
