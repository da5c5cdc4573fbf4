"""The chat LLM back ends and `fspo serve-model`, exercised against a real tiny model and real servers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modeling.llm import (
    ChatRequest,
    LLMError,
    OpenAICompatBackend,
    TransformersBackend,
    backend_from_spec,
)
from tests.modeling.conftest import ADAPTER_NAME, BASE_NAME, ScriptedServer, free_port  # noqa: I001


def ask(text: str, **kwargs: object) -> ChatRequest:
    return ChatRequest(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}], **kwargs
    )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[OpenAICompatBackend]:
    with OpenAICompatBackend(server_url, BASE_NAME, max_retries=0) as backend:
        yield backend


@pytest.fixture(scope="module")
def local(tiny_model_dir: Path) -> TransformersBackend:
    return TransformersBackend(tiny_model_dir)


def test_it_answers_a_chat_over_http(client: OpenAICompatBackend) -> None:
    [reply] = client.chat([ask("What do you recommend?", max_tokens=8, temperature=0.8, seed=1)])

    assert isinstance(reply, str) and reply


def test_it_returns_one_of_the_choices_like_local_scoring(
    client: OpenAICompatBackend, local: TransformersBackend
) -> None:
    choices = ("yes", "no", "maybe", "A much longer answer")
    requests = [
        ask(f"Does the reviewer prefer short answers? Case {i}.", choices=choices, temperature=0)
        for i in range(6)
    ]

    remote = client.chat(requests)

    assert all(r in choices for r in remote)
    assert remote == local.chat(requests)


def test_it_samples_a_choice_by_its_probability_when_temperature_is_positive(
    local: TransformersBackend,
) -> None:
    choices = ("A", "B")
    prompt = local.prompt_ids(ask("Which one? A or B").messages)
    scores = local.score_continuations(prompt, choices)
    greedy = choices[max(range(2), key=scores.__getitem__)]
    assert local.chat([ask("Which one? A or B", choices=choices, temperature=0)]) == [greedy]

    picks = local.chat(
        [ask("Which one? A or B", choices=choices, temperature=5.0, seed=s) for s in range(60)]
    )
    assert set(picks) == {"A", "B"}  # a hot temperature flattens the two log-probs: both come up
    again = local.chat(
        [ask("Which one? A or B", choices=choices, temperature=5.0, seed=s) for s in range(60)]
    )
    assert picks == again  # and a seed pins each pick


def test_it_generates_the_same_greedy_text_over_http_and_locally(
    client: OpenAICompatBackend, local: TransformersBackend
) -> None:
    requests = [
        ask("Describe quiet mornings.", max_tokens=16, temperature=0),
        ask("Explain the rules of chess.", max_tokens=16, temperature=0),
    ]

    assert client.chat(requests) == local.chat(requests)


def test_it_streams_chunks_that_join_to_the_greedy_text(server_url: str, client: OpenAICompatBackend) -> None:
    request = ask("Write about the price of bread.", max_tokens=20, temperature=0)
    body = {
        "model": BASE_NAME,
        "messages": request.messages,
        "max_tokens": 20,
        "temperature": 0,
        "stream": True,
    }

    with httpx.stream("POST", f"{server_url}/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(chunks) > 3
    assert streamed == client.chat([request])[0]


def test_it_serves_a_lora_adapter_by_name(
    server_url: str, client: OpenAICompatBackend, tiny_model_dir: Path, lora_dir: Path
) -> None:
    request = ask("What does the old captain enjoy?", max_tokens=16, temperature=0)
    listed = [m["id"] for m in httpx.get(f"{server_url}/models").json()["data"]]

    with OpenAICompatBackend(server_url, ADAPTER_NAME, max_retries=0) as adapted:
        [with_adapter] = adapted.chat([request])
    [without] = client.chat([request])

    assert listed == [BASE_NAME, ADAPTER_NAME]
    assert with_adapter != without
    assert with_adapter == TransformersBackend(tiny_model_dir, adapter_dir=lora_dir).chat([request])[0]


def test_it_names_an_unknown_model_in_the_error(server_url: str) -> None:
    with (
        OpenAICompatBackend(server_url, "no-such-model", max_retries=2) as backend,
        pytest.raises(LLMError, match="no-such-model") as caught,
    ):
        backend.chat([ask("Hi", max_tokens=4)])

    assert "HTTP 404" in str(caught.value)


def test_it_rejects_malformed_bodies_with_a_clear_400(server_url: str) -> None:
    url = f"{server_url}/chat/completions"
    cases = [
        (b"{not json", "not valid JSON"),
        (json.dumps({"model": BASE_NAME}).encode(), "'messages' is required"),
        (
            json.dumps({"model": BASE_NAME, "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(),
            "'n' must be 1",
        ),
        (
            json.dumps(
                {"model": BASE_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}
            ).encode(),
            "max_tokens must be a positive integer",
        ),
        (
            json.dumps(
                {"model": BASE_NAME, "messages": [{"role": "user", "content": "x"}], "guided_choice": []}
            ).encode(),
            "guided_choice must be",
        ),
    ]
    for content, expected in cases:
        response = httpx.post(url, content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, content
        assert expected in response.json()["error"]["message"]


def test_it_reports_usage_and_the_length_finish_reason(server_url: str) -> None:
    body = {
        "model": BASE_NAME,
        "messages": [{"role": "user", "content": "Tell a funny story."}],
        "max_tokens": 5,
        "temperature": 0,
    }

    reply = httpx.post(f"{server_url}/chat/completions", json=body, timeout=30).json()

    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    usage = reply["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if reply["choices"][0]["finish_reason"] == "length":
        assert usage["completion_tokens"] == 5
    else:
        assert usage["completion_tokens"] <= 5


def test_it_returns_concurrent_replies_in_input_order(client: OpenAICompatBackend) -> None:
    # A one-item guided choice pins each reply, so any reordering shows.
    requests = [ask(f"Item {i}?", choices=(f"answer {i}",)) for i in range(24)]
    progress: list[tuple[int, int]] = []

    replies = client.chat(requests, progress=lambda done, total: progress.append((done, total)))

    assert replies == [f"answer {i}" for i in range(24)]
    assert progress[-1] == (24, 24)
    assert [done for done, _ in progress] == list(range(1, 25))


def test_it_reports_progress_as_each_request_finishes() -> None:
    ok = json.dumps({"choices": [{"message": {"role": "assistant", "content": "fine"}}]}).encode()
    progress: list[tuple[int, int]] = []

    with ScriptedServer([(200, ok)]) as server, OpenAICompatBackend(server.url, "m") as backend:

        def on_progress(done: int, total: int) -> None:
            progress.append((done, total))
            server.release.set()  # the held request may answer only after a first progress report

        backend.chat([ask("HOLD until the other one is reported"), ask("quick")], progress=on_progress)

    assert server.released_in_time == [True]
    assert progress == [(1, 2), (2, 2)]


@pytest.mark.timeout(15)
def test_it_reports_an_unreachable_endpoint() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there

    with (
        OpenAICompatBackend(url, "m", max_retries=1, backoff_s=0.05, timeout_s=5) as backend,
        pytest.raises(LLMError, match=f"cannot reach LLM endpoint {url}: connection refused"),
    ):
        backend.chat([ask("Hi")])


def test_it_retries_server_errors_and_malformed_replies_then_fails() -> None:
    script = [(500, b'{"error": {"message": "boom"}}'), (200, b"<html>not json</html>")]

    with (
        ScriptedServer(script) as server,
        OpenAICompatBackend(server.url, "m", max_retries=3, backoff_s=0.01) as backend,
        pytest.raises(LLMError, match="returned a malformed response") as caught,
    ):
        backend.chat([ask("Hi")])

    assert server.hits == 1 + 3
    assert "\n" not in str(caught.value)


def test_it_recovers_when_a_retry_succeeds() -> None:
    ok = json.dumps({"choices": [{"message": {"role": "assistant", "content": "fine"}}]}).encode()
    script = [(503, b"busy"), (429, b"slow down"), (200, b'{"choices": []}'), (200, ok)]

    with (
        ScriptedServer(script) as server,
        OpenAICompatBackend(server.url, "m", max_retries=3, backoff_s=0.01) as backend,
    ):
        assert backend.chat([ask("Hi")]) == ["fine"]
        assert server.hits == 4


def test_it_does_not_retry_a_rejected_request() -> None:
    with (
        ScriptedServer([(400, b'{"error": {"message": "bad field temperature"}}')]) as server,
        OpenAICompatBackend(server.url, "m", max_retries=3, backoff_s=0.01) as backend,
        pytest.raises(LLMError, match="HTTP 400.*bad field temperature"),
    ):
        backend.chat([ask("Hi")])

    assert server.hits == 1


def test_it_samples_reproducibly_with_a_seed(local: TransformersBackend) -> None:
    seeded = ask("Recommend something.", max_tokens=12, temperature=1.0, seed=7)
    other_seed = ask("Recommend something.", max_tokens=12, temperature=1.0, seed=8)

    first, second, third = local.chat([seeded, seeded, other_seed])

    assert first == second
    assert first != third


def test_it_builds_backends_from_specs(tiny_model_dir: Path) -> None:
    http = backend_from_spec("http://127.0.0.1:8000/v1#my-model")
    assert isinstance(http, OpenAICompatBackend)
    assert (http.base_url, http.model) == ("http://127.0.0.1:8000/v1", "my-model")

    assert isinstance(backend_from_spec(f"hf:{tiny_model_dir}"), TransformersBackend)
    with pytest.raises(LLMError, match="needs the model name"):
        backend_from_spec("http://127.0.0.1:8000/v1")
    with pytest.raises(LLMError, match="unknown LLM spec"):
        backend_from_spec("gpt-nonexistent")


def test_it_rejects_an_invalid_request_up_front() -> None:
    with pytest.raises(ValueError, match="temperature"):
        ask("Hi", temperature=-1)
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        ChatRequest([{"role": "robot", "content": "x"}])
