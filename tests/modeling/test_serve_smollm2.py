"""`fspo serve-model` on the real SmolLM2-135M-Instruct: batching, log-probs, choice probabilities, and
the model checks that refuse a wrong --model or --adapter."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from modeling.cli import main
from modeling.llm import ChatRequest, OpenAICompatBackend, TransformersBackend, ask_choices
from tests.modeling.conftest import SMOLLM2_NAME


def ask(text: str, **kwargs: Any) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], **kwargs)


def metrics(url: str) -> dict[str, Any]:
    return httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).json()


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(url, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def smollm2(smollm2_dir: Path) -> Iterator[TransformersBackend]:
    """SmolLM2 in this process, on one torch thread while the test runs (two threads on a busy 2-core
    machine run several times slower: each waits for the other's core)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TransformersBackend(smollm2_dir)
    torch.set_num_threads(before)


JUDGE = [
    ask(
        "A user who likes very short answers asked how tides work.\n"
        f"Response A: {a}\nResponse B: {b}\nWhich response would this user prefer? Answer A or B.",
        max_tokens=2,
        temperature=0,
        choices=("A", "B"),
    )
    for a, b in (
        ("The Moon's pull.", "Tides are a long story that starts with gravity, the Moon, the Sun and more."),
        ("Tides are a long story that starts with gravity, the Moon, the Sun and more.", "The Moon's pull."),
    )
]


def test_concurrent_requests_run_as_one_batch_and_each_reply_is_the_one_it_gets_alone(
    smollm2_url: str,
) -> None:
    chat = f"{smollm2_url}/chat/completions"
    bodies = [
        {
            "model": SMOLLM2_NAME,
            "messages": [{"role": "user", "content": q}],
            "max_tokens": n,
            "temperature": 0,
        }
        for q, n in (("Name a fruit.", 3), ("What is 2 + 2?", 6), ("Say hello.", 4), ("Name a color.", 5))
    ]
    # A sampled row keeps its own seed in the batch.
    bodies.append({**bodies[0], "temperature": 0.9, "seed": 7, "max_tokens": 5})
    before = metrics(smollm2_url)

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: post(chat, b), bodies))
    during = metrics(smollm2_url)
    alone = [post(chat, b) for b in bodies]

    rows = during["rows"] - before["rows"]
    batches = during["batches"] - before["batches"]
    assert rows == len(bodies)
    assert batches < rows  # some of them shared a generate call
    assert during["largest_batch"] >= 2
    for t, a, body in zip(together, alone, bodies, strict=True):
        assert t["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert t["usage"] == a["usage"]
        assert t["usage"]["completion_tokens"] <= body["max_tokens"]


def test_it_returns_logprobs_in_openai_shape(smollm2_url: str) -> None:
    body = {
        "model": SMOLLM2_NAME,
        "messages": [{"role": "user", "content": "Name a fruit."}],
        "max_tokens": 3,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }

    reply = post(f"{smollm2_url}/chat/completions", body)

    choice = reply["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"] == 3
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # Greedy: the reply's token is the likeliest one.
        assert (top[0]["token"], top[0]["logprob"]) == (entry["token"], entry["logprob"])
        assert entry["logprob"] <= 0
    plain = post(f"{smollm2_url}/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None


def test_it_rejects_bad_logprobs_fields_with_a_clear_400(smollm2_url: str) -> None:
    base = {"model": SMOLLM2_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for extra, message in (
        ({"top_logprobs": 2}, "top_logprobs needs logprobs to be true"),
        ({"logprobs": True, "top_logprobs": 99}, "top_logprobs must be an integer from 0 to 20"),
        ({"logprobs": "yes"}, "logprobs must be a boolean"),
        ({"logprobs": True, "stream": True}, "'logprobs' is not supported with 'stream'"),
    ):
        response = httpx.post(f"{smollm2_url}/chat/completions", json={**base, **extra}, timeout=30)
        assert response.status_code == 400
        assert message in response.json()["error"]["message"]


def test_choice_probabilities_over_http_are_the_local_models(
    smollm2_url: str, smollm2: TransformersBackend
) -> None:
    with OpenAICompatBackend(smollm2_url, SMOLLM2_NAME, max_retries=0) as remote:
        over_http = ask_choices(remote, JUDGE)
    local = ask_choices(smollm2, JUDGE)

    for h, loc in zip(over_http, local, strict=True):
        assert h.text == loc.text
        assert h.probs is not None and loc.probs is not None
        assert math.isclose(sum(loc.probs.values()), 1.0)
        assert h.probs == pytest.approx(loc.probs, abs=1e-4)


def test_a_guided_choice_reply_lists_every_choices_first_token(smollm2_url: str) -> None:
    body = {
        "model": SMOLLM2_NAME,
        "messages": JUDGE[0].messages,
        "guided_choice": ["A", "B", "Neither"],
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 1,
    }

    reply = post(f"{smollm2_url}/chat/completions", body)

    first = reply["choices"][0]["logprobs"]["content"][0]
    listed = {t["token"] for t in first["top_logprobs"]}
    assert {"A", "B", "Ne"} <= listed or {"A", "B", "Neither"} <= listed


def test_serve_model_refuses_a_directory_that_is_not_a_causal_lm(tmp_path: Path, capsys) -> None:
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    (encoder / "model.safetensors").write_bytes(b"")

    assert main(["serve-model", "--model", str(encoder)]) == 2
    assert main(["serve-model", "--model", str(tmp_path / "missing")]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert "is not a causal language model" in err[0] and err[0].startswith("fspo serve-model: error:")
    assert "no such model directory" in err[1]


def test_serve_model_refuses_an_adapter_of_another_base_model(
    smollm2_dir: Path, lora_dir: Path, tmp_path: Path, capsys
) -> None:
    rc = main(["serve-model", "--model", str(smollm2_dir), "--adapter", f"mine={lora_dir}"])

    assert rc == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fspo serve-model: error:") and "a LoRA adapter for another base model" in line


def test_plain_prompts_batched_together_each_stop_at_their_own_stop_string_and_budget(
    smollm2_url: str,
) -> None:
    url = f"{smollm2_url}/completions"
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
    cases = [{"stop": ["."]}, {"stop": [" 6"]}, {}]
    budgets = [12, 12, 4]
    before = metrics(smollm2_url)

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(
            pool.map(
                lambda k: post(
                    url,
                    {"model": SMOLLM2_NAME, "prompt": prompts[k], "max_tokens": budgets[k], "temperature": 0}
                    | cases[k],
                )["choices"][0],
                range(len(prompts)),
            )
        )
    during = metrics(smollm2_url)
    alone = [
        post(url, {"model": SMOLLM2_NAME, "prompt": p, "max_tokens": n, "temperature": 0} | case)["choices"][
            0
        ]
        for p, n, case in zip(prompts, budgets, cases, strict=True)
    ]

    assert during["batches"] - before["batches"] < len(prompts)
    assert together == alone
    assert "." not in together[0]["text"] and together[0]["finish_reason"] == "stop"
    assert " 6" not in together[1]["text"]
    assert together[2]["finish_reason"] == "length"
