"""`fspo eval --judge http://...`: the LLM judge over a real loopback OpenAI-compatible server, end to end.

The arms are "parrot" copies of the tiny model that answer every prompt with one word, so a judge that
prefers a word decides every comparison, and the expected win rates are exact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from modeling.cli import main
from modeling.synth import generate_dataset, load_dataset
from tests.modeling.conftest import ScriptedServer

EPISODES = 6
JUDGE_MODEL = "judge"
SHOWN = re.compile(
    r"about themselves:\n(?P<description>.*)\n\nThe user asked:\n.*\n\n"
    r"Output \(a\):\n(?P<a>.*)\n\nOutput \(b\):\n(?P<b>.*)\n\nWhich output",
    re.DOTALL,
)


def parrot_model(tiny_model_dir: Path, word: str, out: Path) -> Path:
    """A copy of the tiny model that answers any prompt with ``word`` over and over.

    Every block's output projection is zeroed, so the residual stream is the token embedding; dimension
    0 of every embedding is 1 and the final norm keeps only that dimension, so the last hidden state is
    a positive multiple of e_0 whatever the prompt, and the only output row that reads e_0 is ``word``'s.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    [token] = tokenizer.encode(f" {word}", add_special_tokens=False)  # one token, or the test is moot
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token, 0] = 1.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("eval-llm-judge")
    ds = generate_dataset(out_dir=root / "ds", domain="elix", users=60, pairs_per_user=4, seed=0).path
    parrots = {w: parrot_model(tiny_model_dir, w, root / w) for w in ("teacher", "captain", "soup")}
    return ds, parrots


def chat_reply(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


def shown(request_body: bytes) -> dict[str, str]:
    """What the judge was shown: the user's description and outputs (a) and (b)."""
    match = SHOWN.search(json.loads(request_body)["messages"][-1]["content"])
    assert match, "the judge prompt lost its layout"
    return match.groupdict()


def fspo_eval(ds: Path, out: Path, judge_url: str, arms: dict[str, str], *extra: str) -> int:
    argv = ["eval", "--dataset", str(ds), "--baseline", "base", "--out", str(out), *extra]
    argv += ["--episodes", str(EPISODES), "--max-new-tokens", "3", "--judge", f"{judge_url}#{JUDGE_MODEL}"]
    for name, model in arms.items():
        argv += ["--arm", f"{name}={model}:none"]
    return main(argv)


def results(out: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    saved = json.loads((out / "results.json").read_text())
    return saved, {row["arm"]: row for row in saved["table"]}


def test_a_judge_that_always_answers_the_first_position_scores_every_comparison_a_tie(setup, tmp_path):
    ds, parrots = setup
    arms = {"base": parrots["captain"], "other": parrots["teacher"]}

    with ScriptedServer([(200, chat_reply("a"))]) as server:
        rc = fspo_eval(ds, tmp_path / "run", server.url, arms)

    assert rc == 0
    saved, rows = results(tmp_path / "run")
    assert saved["judge"] == f"llm:{server.url}#{JUDGE_MODEL}"
    assert rows["other"]["win_rate"] == 0.5 and rows["other"]["ties"] == EPISODES
    assert rows["other"]["n"] == EPISODES
    # Each comparison was asked in both orders: position bias is what cancelled out.
    orders = sorted((s["a"], s["b"]) for s in map(shown, server.bodies))
    forward = ("teacher teacher teacher", "captain captain captain")
    assert orders == sorted([forward, forward[::-1]] * EPISODES)


def test_a_judge_that_prefers_a_word_gives_its_writer_every_win_and_the_other_words_every_loss(
    setup, tmp_path, capsys
):
    ds, parrots = setup
    rank = ["teacher", "captain"]  # preferred first; a response with neither word is last

    def judge(body: bytes) -> tuple[int, bytes]:
        s = shown(body)
        score = {k: next((-i for i, w in enumerate(rank) if w in s[k]), -len(rank)) for k in "ab"}
        return 200, chat_reply("a" if score["a"] >= score["b"] else "b")

    arms = {
        "base": parrots["captain"],
        "teacher": parrots["teacher"],
        "soup": parrots["soup"],
        "same": parrots["captain"],
    }

    with ScriptedServer(judge) as server:
        rc = fspo_eval(ds, tmp_path / "run", server.url, arms, "--head-to-head", "teacher", "soup")

    assert rc == 0
    saved, rows = results(tmp_path / "run")
    assert saved["judge"] == f"llm:{server.url}#{JUDGE_MODEL}"
    assert (rows["teacher"]["win_rate"], rows["teacher"]["ci_low"], rows["teacher"]["ties"]) == (1.0, 1.0, 0)
    assert (rows["soup"]["win_rate"], rows["soup"]["ci_high"], rows["soup"]["ties"]) == (0.0, 0.0, 0)
    assert (rows["same"]["win_rate"], rows["same"]["ties"]) == (0.5, EPISODES)
    assert rows["base"]["baseline"] is True
    # The head-to-head pair is judged directly: the preferred word's writer wins every comparison.
    (h2h,) = saved["head_to_head"]
    assert (h2h["arm"], h2h["vs"], h2h["win_rate"], h2h["ties"]) == ("teacher", "soup", 1.0, 0)
    # Identical answers tie without a request; every other comparison costs exactly two (two arms
    # against the baseline, one pair head to head).
    assert server.hits == 3 * 2 * EPISODES
    # The judge reads the user's own persona, not a placeholder.
    users = load_dataset(ds).table("users").to_pandas()
    assert {shown(b)["description"] for b in server.bodies} <= set(users.description)
    assert f"judge: llm:{server.url}#{JUDGE_MODEL}" in (tmp_path / "run" / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "100.0%" in printed and "0.0%" in printed
    assert "head to head: teacher vs soup 100.0%" in printed


def test_a_judge_that_never_answers_a_or_b_fails_the_eval_instead_of_reporting_ties(setup, tmp_path, capsys):
    ds, parrots = setup
    arms = {"base": parrots["captain"], "other": parrots["teacher"]}

    with ScriptedServer([(200, chat_reply("Output"))]) as server:
        rc = fspo_eval(ds, tmp_path / "run", server.url, arms)

    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: LLM judge {server.url}#{JUDGE_MODEL} answered none of its {2 * EPISODES} prompts" in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_eval_help_documents_the_llm_judge_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])

    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    assert "--judge oracle|SPEC" in text
    assert "http(s)://HOST:PORT/v1#MODEL" in text and "hf:/path/to/model-dir" in text
    assert "asked in both orders" in text and "ties count as half a win" in text
