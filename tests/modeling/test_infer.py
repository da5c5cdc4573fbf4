"""Personalized generation: shared-prefix reuse against plain generate, back ends, over a real server."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from modeling.data import Episode, Pair, build_cot_prompt, build_prompt, split_cot_output
from modeling.infer import (
    Generation,
    GenerationStats,
    LocalBackend,
    OpenAICompletionsBackend,
    PersonalizationBackend,
    VLLMBackend,
    backend_from_spec,
    generate_for_episodes,
    generate_personalized,
)
from modeling.llm import LLMError, TextRequest, fspo_prompt_ids, generate_ids, plain_prompt_ids
from tests.modeling.conftest import ADAPTER_NAME, BASE_NAME, english_like_sentences

INSTRUCTION = "Answer the question the way this user prefers."
_S = english_like_sentences(80, seed=7)
SHOTS = [Pair(_S[i], f"{_S[i + 1]} {_S[i + 2]}", _S[i + 3]) for i in range(0, 16, 4)]
QUESTIONS = [  # different lengths, so the suffixes need padding
    _S[40],
    f"{_S[41]} {_S[42]} {_S[43]}",
    "Why?",
    f"{_S[44]} {_S[45]}",
    _S[46],
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def run(model_and_tokenizer: tuple[Any, Any], shots: list[Pair], **kwargs: Any) -> list[Generation]:
    model, tokenizer = model_and_tokenizer
    questions = kwargs.pop("questions", QUESTIONS)
    options = {"instruction": INSTRUCTION, "max_new_tokens": 16, **kwargs}
    return generate_personalized(model, tokenizer, shots, questions, **options)


def outputs(generations: list[Generation]) -> list[tuple[Any, ...]]:
    """What must agree between two ways of generating (cached_tokens is bookkeeping, not output)."""
    return [(g.text, g.description, g.prompt_tokens, g.new_tokens, g.finish_reason) for g in generations]


@pytest.mark.parametrize("n_shots", [0, 1, 4])
def test_it_generates_the_same_greedy_text_with_and_without_prefix_reuse(
    model_and_tokenizer: tuple[Any, Any], n_shots: int
) -> None:
    reused = run(model_and_tokenizer, SHOTS[:n_shots], batch_size=2)
    plain = run(model_and_tokenizer, SHOTS[:n_shots], batch_size=2, reuse_prefix=False)

    assert outputs(reused) == outputs(plain)
    assert all(g.text and g.new_tokens == 16 for g in reused)  # a random model runs to the budget


def test_it_runs_fewer_prompt_tokens_through_the_model_with_prefix_reuse(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    with_reuse, without = GenerationStats(), GenerationStats()

    generations = run(model_and_tokenizer, SHOTS, batch_size=2, stats=with_reuse)
    run(model_and_tokenizer, SHOTS, batch_size=2, reuse_prefix=False, stats=without)

    assert with_reuse.prompt_tokens == without.prompt_tokens == sum(g.prompt_tokens for g in generations)
    assert (with_reuse.reused, with_reuse.fallbacks) == (len(QUESTIONS), 0)
    assert all(g.cached_tokens == with_reuse.prefix_tokens > 0 for g in generations)
    assert with_reuse.prompt_tokens_computed < without.prompt_tokens_computed / 2
    assert without.prompt_tokens_computed >= without.prompt_tokens


def test_it_stops_each_row_at_its_own_eos_like_generate(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tokenizer = model_and_tokenizer
    # A random model never writes EOS, so make tokens from the middle of its greedy replies stop
    # tokens: rows then finish at different steps and leave the batch early.
    prompts = [
        plain_prompt_ids(tokenizer, build_prompt(SHOTS[:1], q, instruction=INSTRUCTION)) for q in QUESTIONS
    ]
    greedy = [TextRequest("", temperature=0.0)] * len(prompts)
    free = generate_ids(
        model, prompts, greedy, 16, stop_ids={tokenizer.eos_token_id}, pad_id=tokenizer.pad_token_id
    )
    extra = {free[0][0][5], free[1][0][9]}
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [original, *sorted(extra)]
    try:
        reused = run(model_and_tokenizer, SHOTS[:1], batch_size=4)
        plain = run(model_and_tokenizer, SHOTS[:1], batch_size=4, reuse_prefix=False)
    finally:
        model.generation_config.eos_token_id = original

    assert outputs(reused) == outputs(plain)
    assert "stop" in {g.finish_reason for g in reused}
    assert len({g.new_tokens for g in reused}) > 1


def test_it_samples_reproducibly_with_a_seed_and_differently_across_seeds(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    first = run(model_and_tokenizer, SHOTS, temperature=1.0, top_p=0.9, seed=11)
    again = run(model_and_tokenizer, SHOTS, temperature=1.0, top_p=0.9, seed=11, batch_size=2)
    plain = run(model_and_tokenizer, SHOTS, temperature=1.0, top_p=0.9, seed=11, reuse_prefix=False)
    other = run(model_and_tokenizer, SHOTS, temperature=1.0, top_p=0.9, seed=12)

    assert [g.text for g in first] == [g.text for g in again] == [g.text for g in plain]
    assert all(a.text != b.text for a, b in zip(first, other, strict=True))
    assert len({g.text for g in first}) == len(QUESTIONS)  # each question draws its own stream


def test_it_gives_a_seeded_question_the_same_sample_whatever_is_asked_with_it(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    together = run(model_and_tokenizer, SHOTS[:1], temperature=1.0, seed=5)
    alone = run(model_and_tokenizer, SHOTS[:1], temperature=1.0, seed=5, questions=[QUESTIONS[3]])

    assert alone[0].text == together[3].text


def test_it_splits_a_cot_output_into_description_and_response() -> None:
    assert split_cot_output("Likes short answers.\n## Preferred Response\nRain is water.\n") == (
        "Likes short answers.",
        "Rain is water.",
    )
    assert split_cot_output("## Preferred Response\nJust this.") == ("", "Just this.")
    assert split_cot_output("A description that never ends") == ("A description that never ends", "")


def test_it_returns_the_models_own_description_separately_with_cot(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    model, tokenizer = model_and_tokenizer
    generations = run(model_and_tokenizer, SHOTS[:2], cot=True)

    # The raw continuation of the CoT prompt, split where the response header is (if it is there).
    prompts = [
        plain_prompt_ids(tokenizer, build_cot_prompt(SHOTS[:2], q, instruction=INSTRUCTION))
        for q in QUESTIONS
    ]
    greedy = [TextRequest("", temperature=0.0)] * len(prompts)
    stop_ids, pad_id = {tokenizer.eos_token_id}, tokenizer.pad_token_id
    raw = generate_ids(model, prompts, greedy, 16, stop_ids=stop_ids, pad_id=pad_id)
    expected = [split_cot_output(tokenizer.decode(ids, skip_special_tokens=True)) for ids, _ in raw]
    assert [(g.description, g.text) for g in generations] == expected
    assert all(isinstance(g.description, str) for g in generations)
    assert generations[0].prompt_tokens == len(prompts[0])


def test_it_puts_a_given_description_in_the_prompt_and_returns_it(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    _, tokenizer = model_and_tokenizer
    description = "Prefers formal letters written in plain words."

    generations = run(model_and_tokenizer, SHOTS[:1], description=description, questions=QUESTIONS[:2])
    plain = run(
        model_and_tokenizer, SHOTS[:1], description=description, questions=QUESTIONS[:2], reuse_prefix=False
    )

    prompt = build_prompt(SHOTS[:1], QUESTIONS[0], instruction=INSTRUCTION, description=description)
    assert generations[0].description == description
    assert generations[0].prompt_tokens == len(plain_prompt_ids(tokenizer, prompt))
    assert outputs(generations) == outputs(plain)


def test_it_encodes_the_markdown_prompt_with_one_bos_and_no_chat_template(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    _, tokenizer = model_and_tokenizer
    prompt = build_prompt(SHOTS[:1], QUESTIONS[0], instruction=INSTRUCTION)

    ids = plain_prompt_ids(tokenizer, prompt)

    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert plain_prompt_ids(tokenizer, tokenizer.bos_token + prompt) == ids
    assert tokenizer.decode(ids[1:]) == prompt  # nothing but the Markdown (no "### User:" template)


def test_it_reuses_the_shared_tokens_even_when_a_tokenizer_merges_across_the_question(
    tmp_path: Path,
) -> None:
    # A SentencePiece-style tokenizer (Llama 2) prepends "▁" to any text it encodes, so the text before
    # the question does not tokenize as the start of the full prompt; the cut is on the prompts' ids.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from modeling.tinymodel import SPECIAL_TOKENS, build_tiny_causal_lm

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False)
    bpe.train_from_iterator([*english_like_sentences(300), "# ## \n ? ."], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    model_dir = build_tiny_causal_lm(tmp_path / "sp", tokenizer)
    pair = (AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer)
    stats = GenerationStats()

    reused = run(pair, SHOTS[:2], questions=QUESTIONS[:3], max_new_tokens=6, stats=stats)
    plain = run(pair, SHOTS[:2], questions=QUESTIONS[:3], max_new_tokens=6, reuse_prefix=False)

    assert (stats.reused, stats.fallbacks) == (3, 0)
    assert outputs(reused) == outputs(plain)
    assert all(g.cached_tokens == stats.prefix_tokens > 0 for g in reused)


@contextmanager
def context_of(model: Any, tokens: int) -> Iterator[None]:
    """The model's context (``max_position_embeddings``, what ``context_length`` reads) set to
    ``tokens`` for a while: RoPE does not depend on it, so the outputs of prompts that fit are unchanged."""
    original = model.config.max_position_embeddings
    model.config.max_position_embeddings = tokens
    try:
        yield
    finally:
        model.config.max_position_embeddings = original


def test_a_prompt_longer_than_the_context_drops_its_earliest_shots_and_says_how_many(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    model, tokenizer = model_and_tokenizer
    long = " ".join(_S[50:56])
    questions = ["Why?", long, "How?"]

    def length(cut: int, question: str) -> int:
        return len(plain_prompt_ids(tokenizer, build_prompt(SHOTS[cut:], question, instruction=INSTRUCTION)))

    new = 4
    # The short questions fit without their first shot, the long one only without its first two.
    limit = max(length(1, "Why?"), length(1, "How?")) + new
    assert min(length(0, "Why?"), length(0, "How?"), length(1, long)) + new > limit >= length(2, long) + new
    stats, plain_stats = GenerationStats(), GenerationStats()

    with context_of(model, limit):
        cut = run(model_and_tokenizer, SHOTS, questions=questions, max_new_tokens=new, stats=stats)
        plain = run(
            model_and_tokenizer,
            SHOTS,
            questions=questions,
            max_new_tokens=new,
            reuse_prefix=False,
            stats=plain_stats,
        )
    by_hand = [
        run(model_and_tokenizer, SHOTS[k:], questions=[q], max_new_tokens=new)[0]
        for k, q in zip((1, 2, 1), questions, strict=True)
    ]

    assert [g.shots_cut for g in cut] == [1, 2, 1]
    assert outputs(cut) == outputs(plain) == outputs(by_hand)
    assert (stats.shots_cut, stats.prompts_cut) == (plain_stats.shots_cut, plain_stats.prompts_cut) == (4, 3)
    assert stats.reused == 2  # the two short questions keep the same shots, so they still share them
    assert all(g.prompt_tokens + new <= limit for g in cut)


def test_it_cuts_nothing_from_prompts_that_fit(model_and_tokenizer: tuple[Any, Any]) -> None:
    stats = GenerationStats()

    generations = run(model_and_tokenizer, SHOTS, questions=QUESTIONS[:2], max_new_tokens=2, stats=stats)

    assert (stats.shots_cut, stats.prompts_cut) == (0, 0)
    assert {g.shots_cut for g in generations} == {0}


def test_it_says_clearly_when_a_question_does_not_fit_even_without_shots(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    with pytest.raises(
        LLMError, match="with every shot cut \\+ 5000 new tokens exceeds the model's context of 2048"
    ):
        run(model_and_tokenizer, SHOTS, max_new_tokens=5000)
    with pytest.raises(ValueError, match="questions"):
        run(model_and_tokenizer, SHOTS, questions=["fine", "  "])


def sliding_window_model(kind: str, tokenizer: Any) -> Any:
    """A tiny random-weight Gemma 2 or Mistral whose attention window (16) is far shorter than a prompt."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "sliding_window": 16,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config_class, model_class = {
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_class(config_class(**common)).eval()


@pytest.mark.parametrize("kind", ["gemma2", "mistral"])
def test_a_sliding_window_model_takes_the_plain_path_and_says_why_once(
    model_and_tokenizer: tuple[Any, Any], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    from modeling.infer import decoding

    _, tokenizer = model_and_tokenizer
    pair = (sliding_window_model(kind, tokenizer), tokenizer)
    decoding._log_once.cache_clear()
    stats = GenerationStats()

    with caplog.at_level("WARNING", logger="modeling.infer.decoding"):
        generations = run(pair, SHOTS[:1], questions=QUESTIONS[:3], max_new_tokens=6, stats=stats)
        run(pair, SHOTS[:1], questions=QUESTIONS[:2], max_new_tokens=2)
    plain = run(pair, SHOTS[:1], questions=QUESTIONS[:3], max_new_tokens=6, reuse_prefix=False)

    assert outputs(generations) == outputs(plain)
    assert (stats.reused, stats.fallbacks) == (0, 3)
    reasons = [
        r.getMessage() for r in caplog.records if "sliding-window attention (window 16)" in r.getMessage()
    ]
    assert len(reasons) == 1


def test_a_mistral_without_a_sliding_window_reuses_the_prefix(model_and_tokenizer: tuple[Any, Any]) -> None:
    _, tokenizer = model_and_tokenizer
    model = sliding_window_model("mistral", tokenizer)
    model.config.sliding_window = None
    stats = GenerationStats()

    reused = run((model, tokenizer), SHOTS[:1], questions=QUESTIONS[:3], max_new_tokens=6, stats=stats)
    plain = run((model, tokenizer), SHOTS[:1], questions=QUESTIONS[:3], max_new_tokens=6, reuse_prefix=False)

    assert (stats.reused, stats.fallbacks) == (3, 0)
    assert outputs(reused) == outputs(plain)


# ---------------------------------------------------------------------------------------------------
# Back ends


@pytest.fixture(scope="module")
def local(tiny_model_dir: Path) -> LocalBackend:
    return LocalBackend(tiny_model_dir)


@pytest.fixture(scope="module")
def remote(server_url: str) -> Iterator[OpenAICompletionsBackend]:
    with OpenAICompletionsBackend(server_url, BASE_NAME, max_retries=0) as backend:
        yield backend


def test_it_generates_the_same_greedy_text_over_http_completions_and_locally(
    remote: OpenAICompletionsBackend, local: LocalBackend
) -> None:
    for kwargs in ({}, {"cot": True}):
        over_http = remote.generate(SHOTS, QUESTIONS, instruction=INSTRUCTION, max_new_tokens=12, **kwargs)
        here = local.generate(SHOTS, QUESTIONS, instruction=INSTRUCTION, max_new_tokens=12, **kwargs)

        assert outputs(over_http) == outputs(here)
    assert local.last_stats.reused == len(QUESTIONS)
    assert isinstance(remote, PersonalizationBackend) and isinstance(local, PersonalizationBackend)


def test_it_samples_the_same_over_http_with_a_seed(
    remote: OpenAICompletionsBackend, local: LocalBackend
) -> None:
    kwargs: dict[str, Any] = {"instruction": INSTRUCTION, "max_new_tokens": 10, "temperature": 0.8, "seed": 3}

    assert outputs(remote.generate(SHOTS[:1], QUESTIONS, **kwargs)) == outputs(
        local.generate(SHOTS[:1], QUESTIONS, **kwargs)
    )


def test_it_selects_a_lora_adapter_by_model_name_over_http(
    server_url: str,
    tiny_model_dir: Path,
    lora_dir: Path,
    local: LocalBackend,
) -> None:
    kwargs: dict[str, Any] = {"instruction": INSTRUCTION, "max_new_tokens": 10}

    with OpenAICompletionsBackend(server_url, ADAPTER_NAME, max_retries=0) as adapted:
        over_http = adapted.generate(SHOTS[:2], QUESTIONS[:3], **kwargs)
    here = LocalBackend(tiny_model_dir, adapter=lora_dir).generate(SHOTS[:2], QUESTIONS[:3], **kwargs)

    assert outputs(over_http) == outputs(here)
    assert outputs(here) != outputs(local.generate(SHOTS[:2], QUESTIONS[:3], **kwargs))


@pytest.fixture(scope="module")
def chat_checkpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a checkpoint whose fspo.json says it was trained on chat-wrapped prompts."""
    import shutil

    from modeling.data import PROMPT_FORMAT_VERSION

    out = tmp_path_factory.mktemp("chat-checkpoint") / "model"
    shutil.copytree(tiny_model_dir, out)
    manifest = {"prompt_format_version": PROMPT_FORMAT_VERSION, "config": {"chat_template": True}}
    (out / "fspo.json").write_text(json.dumps(manifest))
    return out


def test_a_checkpoint_trained_on_the_chat_template_gets_chat_wrapped_prompts(
    chat_checkpoint: Path, model_and_tokenizer: tuple[Any, Any], local: LocalBackend
) -> None:
    _, tokenizer = model_and_tokenizer
    backend = LocalBackend(chat_checkpoint)

    generations = backend.generate(SHOTS[:2], QUESTIONS[:3], instruction=INSTRUCTION, max_new_tokens=6)
    by_hand = run(
        model_and_tokenizer, SHOTS[:2], questions=QUESTIONS[:3], max_new_tokens=6, chat_template=True
    )
    plain = local.generate(SHOTS[:2], QUESTIONS[:3], instruction=INSTRUCTION, max_new_tokens=6)

    prompt = build_prompt(SHOTS[:2], QUESTIONS[0], instruction=INSTRUCTION)
    wrapped = fspo_prompt_ids(tokenizer, prompt, chat_template=True)
    assert tokenizer.decode(wrapped).startswith(f"{tokenizer.bos_token}### User:\n# Example 1")
    assert backend.chat_template and not local.chat_template
    assert generations[0].prompt_tokens == len(wrapped) != plain[0].prompt_tokens
    assert outputs(generations) == outputs(by_hand)
    assert backend.last_stats.reused == 3


def test_the_completions_backend_sends_the_chat_wrapped_text_when_asked(
    server_url: str, tiny_model_dir: Path, chat_checkpoint: Path
) -> None:
    kwargs: dict[str, Any] = {"instruction": INSTRUCTION, "max_new_tokens": 6}
    here = LocalBackend(chat_checkpoint).generate(SHOTS[:1], QUESTIONS[:2], **kwargs)

    with OpenAICompletionsBackend(
        server_url, BASE_NAME, max_retries=0, chat_template=True, tokenizer=tiny_model_dir
    ) as remote:
        over_http = remote.generate(SHOTS[:1], QUESTIONS[:2], **kwargs)

    assert outputs(over_http) == outputs(here)


def test_it_completes_a_list_of_plain_prompts_with_usage_and_stop_strings(server_url: str) -> None:
    prompts = [build_prompt(SHOTS[:1], q, instruction=INSTRUCTION) for q in QUESTIONS[:2]]
    body = {"model": BASE_NAME, "prompt": prompts, "max_tokens": 8, "temperature": 0}

    reply = httpx.post(f"{server_url}/completions", json=body, timeout=60).json()

    assert reply["object"] == "text_completion"
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert {c["finish_reason"] for c in reply["choices"]} == {"length"}
    usage = reply["usage"]
    assert usage["completion_tokens"] == 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + 16

    text = reply["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = httpx.post(
        f"{server_url}/completions", json={**body, "prompt": prompts[0], "stop": stop}, timeout=60
    ).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert 0 < cut["usage"]["completion_tokens"] <= 8


def test_it_rejects_malformed_completions_bodies_with_a_clear_400(server_url: str) -> None:
    url = f"{server_url}/completions"
    cases = [
        ({"model": BASE_NAME}, "'prompt' is required"),
        ({"model": BASE_NAME, "prompt": [1, 2, 3]}, "'prompt' is required"),
        ({"model": BASE_NAME, "prompt": "x", "n": 2}, "'n' must be 1"),
        ({"model": BASE_NAME, "prompt": "x", "stream": True}, "'stream' is not supported"),
        ({"model": BASE_NAME, "prompt": "x", "max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"model": BASE_NAME, "prompt": "x", "stop": [""]}, "stop must be"),
    ]
    for body, expected in cases:
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == 400, body
        assert expected in response.json()["error"]["message"]
    missing = httpx.post(url, json={"model": "nope", "prompt": "x"}, timeout=30)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


def test_it_generates_for_episodes_grouped_by_user_in_one_batched_call(local: LocalBackend) -> None:
    users = {"a": SHOTS[:2], "b": SHOTS[2:], "c": SHOTS[1:3]}
    asked = [
        ("a", QUESTIONS[0]),
        ("b", QUESTIONS[1]),
        ("c", QUESTIONS[4]),
        ("a", QUESTIONS[2]),
        ("b", QUESTIONS[3]),
    ]
    episodes = [
        Episode(instruction=INSTRUCTION, shots=tuple(users[u]), question=q, user_id=u) for u, q in asked
    ]

    generations = generate_for_episodes(local, episodes, max_new_tokens=6)
    stats = local.last_stats

    one_by_one = [
        local.generate(users[u], [q], instruction=INSTRUCTION, max_new_tokens=6)[0] for u, q in asked
    ]
    assert outputs(generations) == outputs(one_by_one)
    assert (stats.questions, stats.reused) == (
        5,
        4,
    )  # users a and b reuse their prefix; c's lone question does not


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_it_says_how_to_install_vllm_when_it_is_missing(tiny_model_dir: Path) -> None:
    with pytest.raises(LLMError) as caught:
        VLLMBackend(tiny_model_dir, enable_lora=True)

    assert str(caught.value) == "vLLM is not installed: pip install 'fspo-studies[vllm]' on a GPU host"


def test_it_reports_a_bad_model_or_adapter_directory_clearly(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LLMError, match="is not a directory"):
        LocalBackend(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMError, match=f"cannot load model: {tmp_path / 'empty'}: not a Hugging Face model"):
        LocalBackend(tmp_path / "empty")
    with pytest.raises(LLMError, match="has no adapter_config.json"):
        LocalBackend(tiny_model_dir, adapter=tmp_path / "empty")
    stale = tmp_path / "stale-checkpoint"
    stale.mkdir()
    (stale / "fspo.json").write_text(json.dumps({"prompt_format_version": "fspo-markdown-0"}))
    with pytest.raises(LLMError, match="uses prompt format 'fspo-markdown-0'"):
        LocalBackend(stale)


def test_it_builds_backends_from_specs(
    tiny_model_dir: Path,
    lora_dir: Path,
) -> None:
    http = backend_from_spec("http://127.0.0.1:8000/v1#my-adapter")
    assert isinstance(http, OpenAICompletionsBackend)
    assert (http.client.base_url, http.client.model) == ("http://127.0.0.1:8000/v1", "my-adapter")

    assert isinstance(backend_from_spec(str(tiny_model_dir)), LocalBackend)
    adapted = backend_from_spec(f"hf:{lora_dir}")
    assert isinstance(adapted, LocalBackend) and adapted.name == f"hf:{tiny_model_dir}+{lora_dir}"
    with pytest.raises(LLMError, match="vLLM is not installed"):
        backend_from_spec(f"vllm:{tiny_model_dir}")
    with pytest.raises(LLMError, match="needs the model name"):
        backend_from_spec("http://127.0.0.1:8000/v1")
    with pytest.raises(LLMError, match="unknown generation spec"):
        backend_from_spec("gpt-nonexistent")
