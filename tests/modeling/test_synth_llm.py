"""The LLM data engine end to end against `fspo serve-model` on loopback with a tiny real model."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from modeling.llm import LLMError, OpenAICompatBackend
from modeling.synth import DatasetError, load_dataset
from modeling.synth.llm_pipeline import LLMStages, generate_with_llm, judge_pair, parse_choice
from tests.modeling.conftest import REPO_ROOT, ScriptedServer, free_port, serve_model

SMALL = dict(
    domain="roleplay",
    users=5,
    pairs_per_user=2,
    questions=6,
    responses_per_question=3,
    max_rounds=2,
    judge_temperature=1.0,
    # The tiny random model's P(first is better), averaged over both orders, lies within 0.001 of 1/2:
    # a margin inside that spread decides some pairs and leaves others to persona refinement.
    judge_margin=0.0003,
)


@pytest.fixture(scope="module")
def llm_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_model(
        tiny_model_dir,
        tmp_path_factory.mktemp("serve") / "serve.log",
        "--served-name",
        "tiny",
        "--threads",
        "1",  # the tiny model's matrices are too small to share; one thread stays fast on a busy machine
    ) as url:
        yield url


def test_it_writes_a_complete_dataset_through_the_http_path(llm_url, tmp_path):
    info = generate_with_llm(llm=f"{llm_url}#tiny", out_dir=tmp_path / "d", **SMALL)
    ds = load_dataset(info.path)
    assert ds.manifest["backend"] == f"llm:{llm_url}#tiny"
    assert ds.manifest["prompts_version"] == 2
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


SHOWN = re.compile(r"Response A:\n(?P<a>.*)\n\nResponse B:\n(?P<b>.*)\n\nWhich response", re.DOTALL)


def vllm_like(body: bytes) -> tuple[int, bytes]:
    """An OpenAI-compatible server that writes replies whose length follows the call's seed, and judges
    with log-probs in vLLM's shape: it prefers the longer response a little and the first position a
    lot, so P(longer is better) averaged over both orders is 0.54 (0.6 shown first, 0.48 shown second)."""
    request = json.loads(body)
    if "guided_choice" not in request:
        text = " ".join(["word"] * (1 + request.get("seed", 0) % 7))
        return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
    shown = SHOWN.search(request["messages"][-1]["content"])
    assert shown, "the judge prompt lost its layout"
    p_a = 0.6 if len(shown["a"]) >= len(shown["b"]) else 0.52
    top = [{"token": "A", "logprob": math.log(p_a)}, {"token": "B", "logprob": math.log(1 - p_a)}]
    choice = {
        "message": {"role": "assistant", "content": "A"},
        "logprobs": {"content": [{"token": "A", "logprob": top[0]["logprob"], "top_logprobs": top}]},
    }
    return 200, json.dumps({"choices": [choice]}).encode()


TINY = dict(domain="elix", users=3, pairs_per_user=1, questions=4, responses_per_question=2, max_rounds=0)


def test_a_run_whose_judge_decides_no_pair_keeps_its_journal_and_report_and_a_rerun_reuses_them(tmp_path):
    out = tmp_path / "d"
    with ScriptedServer(vllm_like) as server:
        with pytest.raises(LLMError, match=r"the LLM judge decided no pair \(.*labels: kept 0 of 9") as err:
            generate_with_llm(llm=f"{server.url}#m", out_dir=out, judge_margin=0.1, **TINY)
        asked_first = server.hits
        assert "position bias" in str(err.value) and "\n" not in str(err.value)
        assert not out.exists()
        report = json.loads((tmp_path / "d.work" / "report.json").read_text())
        assert report["labels"]["kept"] == 0 and report["labels"]["judge_read"] == "probabilities"
        assert sum(report["labels"]["dropped"].values()) == 9
        assert report["questions"] == {
            "asked": 4,
            "kept": 4,
            "dropped": {"empty replies (the template question is used instead)": 0},
        }
        journal = (tmp_path / "d.work" / "calls.jsonl").read_text().splitlines()
        assert len(journal) == asked_first

        info = generate_with_llm(llm=f"{server.url}#m", out_dir=out, judge_margin=0.03, **TINY)

    calls = info.manifest["llm_calls"]
    assert calls["reused_from_journal"] == asked_first  # nothing asked before was asked again
    assert server.hits == asked_first + calls["made"]
    assert info.manifest["counts"]["preferences"] == 3
    assert info.manifest["stages"]["labels"]["kept"] == 3
    assert info.manifest["config"]["llm"]["judge_margin"] == 0.03
    # The judge preferred the longer response: the dataset says so.
    prefs = load_dataset(info.path).table("preferences").to_pandas()
    responses = load_dataset(info.path).table("responses").to_pandas().set_index("response_id")
    chosen = responses.loc[prefs.chosen_id, "text"].str.len().to_numpy()
    rejected = responses.loc[prefs.rejected_id, "text"].str.len().to_numpy()
    assert (chosen >= rejected).all()


def test_each_stage_samples_at_its_own_temperature_and_the_manifest_records_them(tmp_path):
    stages = LLMStages(
        question_temperature=0.1,
        response_temperature=0.2,
        persona_temperature=0.3,
        top_p=0.8,
        judge_margin=0.03,
    )
    with ScriptedServer(vllm_like) as server:
        info = generate_with_llm(llm=f"{server.url}#m", out_dir=tmp_path / "d", stages=stages, **TINY)
    sent = [json.loads(b) for b in server.bodies]

    def stage_of(body):
        system = body["messages"][0]["content"]
        return next(
            k
            for k, word in (
                ("question", "questions"),
                ("response", "helpful"),
                ("persona", "persona"),
                ("judge", "evaluator"),
            )
            if word in system
        )

    seen = {(stage_of(b), b["temperature"], b["top_p"]) for b in sent}
    assert {s for s in seen if s[0] != "judge"} == {
        ("question", 0.1, 0.8),
        ("response", 0.2, 0.8),
        ("persona", 0.3, 0.8),
    }
    labels = [b for b in sent if stage_of(b) == "judge" and b["temperature"] == 0]
    assert len(labels) == 18  # 3 users x 3 candidate pairs x 2 orders, read by their probabilities
    assert all(b["logprobs"] and b["top_logprobs"] == 20 and b["guided_choice"] == ["A", "B"] for b in labels)
    repeats = [b for b in sent if stage_of(b) == "judge" and b["temperature"] == 1.0]
    assert len(repeats) == info.manifest["counts"]["preferences"]  # the sampled re-ask of each kept pair
    assert info.manifest["config"]["llm"] == {
        "question_temperature": 0.1,
        "response_temperature": 0.2,
        "persona_temperature": 0.3,
        "refine_temperature": 0.3,
        "judge_temperature": 0.0,
        "top_p": 0.8,
        "judge_margin": 0.03,
    }


def test_bad_stage_settings_fail_before_any_call(tmp_path):
    with ScriptedServer(vllm_like) as server:
        for bad, message in (
            ({"judge_margin": 0.5}, "judge_margin must be from 0 to below 0.5"),
            ({"refine_temperature": -1}, "refine_temperature must be from 0 to 2"),
            ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
            ({"llm_concurrency": 0}, "llm_concurrency must be a positive integer"),
        ):
            with pytest.raises(ValueError, match=message):
                generate_with_llm(llm=f"{server.url}#m", out_dir=tmp_path / "d", **TINY, **bad)
        assert server.hits == 0
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.work").exists()


@pytest.mark.parametrize(
    ("ab", "ba", "outcome"),
    [
        (0.9, 0.3, "first"),  # P(first better) = (0.9 + 0.3) / 2 = 0.6: clears a 0.05 margin
        (0.1, 0.7, "second"),
        (0.95, 0.07, "position"),  # "A" both times: what a small model does
        (0.56, 0.5, "close"),
    ],
)
def test_the_judge_averages_p_first_is_better_over_both_orders(ab, ba, outcome):
    reply_ab = {"text": "A", "probs": {"A": ab, "B": 1 - ab}}
    reply_ba = {"text": "A", "probs": {"A": 1 - ba, "B": ba}}

    decided, p = judge_pair(reply_ab, reply_ba, margin=0.05)

    assert decided == outcome
    assert p == pytest.approx((ab + ba) / 2)


def test_a_sampled_letter_counts_as_certainty_where_no_probabilities_come_back():
    assert judge_pair({"text": "A"}, {"text": "B"}, margin=0.1) == ("first", 1.0)
    assert judge_pair({"text": "A"}, {"text": "A"}, margin=0.1) == ("position", 0.5)
    assert judge_pair({"text": "A"}, {"text": "neither"}, margin=0.1) == ("unreadable", None)


def test_the_cli_refuses_llm_stage_flags_without_an_llm_and_bad_values(tmp_path, capsys):
    from modeling.cli import main

    out = ["--users", "2", "--pairs-per-user", "1", "--out", str(tmp_path / "d")]
    assert main(["synth", *out, "--judge-margin", "0.2", "--refine-temperature", "0.1"]) == 2
    assert main(["synth", *out, "--llm", "http://127.0.0.1:1/v1#m", "--judge-margin", "0.7"]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --refine-temperature, --judge-margin only apply with --llm",
        "error: judge_margin must be from 0 to below 0.5, got 0.7",
    ]
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.work").exists()
