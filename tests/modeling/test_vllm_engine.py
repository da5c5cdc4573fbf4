"""The vLLM path's pure part, without vLLM (it cannot be installed here): users' questions as the
engine's inputs, the adapters' ids, the shared engine's options, and the clear errors before any engine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from modeling.data import Pair, build_prompt
from modeling.infer import (
    VLLM_MISSING,
    UserQuestions,
    VLLMBackend,
    engine_requests,
    question_seed,
    vllm_engine,
)
from modeling.infer.vllm_engine import ENGINE_DEFAULTS, LoRAIds, engine_key, engine_options
from modeling.llm import LLMError, fspo_prompt_ids

INSTRUCTION = "Answer the question the way this user prefers."
vllm_absent = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def users() -> list[UserQuestions]:
    a_shots = (
        Pair("Is the film worth it?", "Yes, for the music alone.", "It is a film."),
        Pair("How was the food?", "The soup was the best part.", "Fine."),
    )
    b_shots = (Pair("Would you go back?", "Every summer, with the kids.", "Maybe."),)
    a = UserQuestions(a_shots, ("Tell me about the hotel.", "And the beach?", "Any advice?"), INSTRUCTION)
    return [a, UserQuestions(b_shots, ("What did you think?", "Was it loud?"), INSTRUCTION)]


def common_prefix(rows: list[list[int]]) -> int:
    n = 0
    while all(len(r) > n and r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def test_each_question_is_one_request_encoded_as_locally_and_seeded_by_its_question(tokenizer) -> None:
    requests, fitted = engine_requests(
        users(),
        lambda text: fspo_prompt_ids(tokenizer, text),
        max_model_len=None,
        cot=False,
        max_new_tokens=12,
        temperature=0.7,
        top_p=0.9,
        seed=3,
    )

    asked = [(u, q) for u in users() for q in u.questions]
    assert len(requests) == 5
    for request, (user, question) in zip(requests, asked, strict=True):
        prompt = build_prompt(user.shots, question, instruction=INSTRUCTION)
        assert request.prompt_token_ids == fspo_prompt_ids(tokenizer, prompt)
        assert (request.max_tokens, request.temperature, request.top_p) == (12, 0.7, 0.9)
        assert request.seed == question_seed(3, question)
        assert (request.description, request.shots_cut) == (None, 0)
    assert fitted.restore(list(range(5)), users()) == [[0, 1, 2], [3, 4]]  # type: ignore[arg-type]


def test_a_users_questions_share_their_few_shot_block_as_the_engines_cached_prefix(tokenizer) -> None:
    requests, _ = engine_requests(
        users(),
        lambda text: fspo_prompt_ids(tokenizer, text),
        max_model_len=None,
        cot=False,
        max_new_tokens=8,
        temperature=0.0,
        top_p=1.0,
        seed=None,
    )

    first_user = [r.prompt_token_ids for r in requests[:3]]
    shared = tokenizer.decode(first_user[0][: common_prefix(first_user)])
    # Everything up to the question is shared: both shots, then the task.
    assert "The soup was the best part." in shared and "# Task" in shared
    assert "Tell me about the hotel." not in shared
    assert common_prefix([r.prompt_token_ids for r in requests]) < common_prefix(first_user)


def test_a_prompt_too_long_for_the_engine_loses_its_earliest_shots(tokenizer) -> None:
    def encode(text: str) -> list[int]:
        return fspo_prompt_ids(tokenizer, text)

    full = [len(encode(p)) for p in users()[0].prompts()]
    one_shot = [
        len(encode(build_prompt(users()[0].shots[1:], q, instruction=INSTRUCTION)))
        for q in users()[0].questions
    ]
    limit = max(one_shot) + 8  # room for one shot of user a and 8 new tokens, not for two
    assert max(full) + 8 > limit

    requests, _ = engine_requests(
        users()[:1],
        encode,
        max_model_len=limit,
        cot=False,
        max_new_tokens=8,
        temperature=0.0,
        top_p=1.0,
        seed=None,
    )

    assert [r.shots_cut for r in requests] == [1, 1, 1]
    assert all(len(r.prompt_token_ids) + 8 <= limit for r in requests)


def test_an_engine_numbers_its_adapters_one_id_per_directory_however_spelled(tmp_path: Path) -> None:
    (tmp_path / "fspo").mkdir(), (tmp_path / "ipo").mkdir()
    ids = LoRAIds()

    assert ids.id_of(tmp_path / "fspo") == 1
    assert ids.id_of(tmp_path / "ipo") == 2
    assert ids.id_of(tmp_path / "ipo" / ".." / "fspo") == 1


def test_the_shared_engine_has_prefix_caching_and_lora_on_unless_told_otherwise(tmp_path: Path) -> None:
    assert engine_options() == dict(ENGINE_DEFAULTS)
    assert engine_options()["enable_prefix_caching"] is True and engine_options()["enable_lora"] is True
    assert engine_options(max_loras=8, dtype="bfloat16")["max_loras"] == 8
    # One engine per base and options, whichever order the options come in.
    same = engine_key(tmp_path, {"a": 1, "b": 2}) == engine_key(tmp_path / ".", {"b": 2, "a": 1})
    assert same and engine_key(tmp_path, {"a": 1}) != engine_key(tmp_path, {"a": 2})


def test_an_adapter_above_the_engines_lora_rank_is_refused_before_any_engine(
    tiny_model_dir: Path, lora_dir: Path
) -> None:
    with pytest.raises(
        LLMError, match=r"its rank 8 is above the engine's max_lora_rank 4 \(pass max_lora_rank=8"
    ):
        VLLMBackend(tiny_model_dir, adapter=lora_dir, max_lora_rank=4)


@vllm_absent
def test_without_vllm_the_engine_and_the_backend_say_how_to_install_it(
    tiny_model_dir: Path, lora_dir: Path
) -> None:
    with pytest.raises(LLMError) as caught:
        vllm_engine(tiny_model_dir)
    assert str(caught.value) == VLLM_MISSING
    with pytest.raises(LLMError, match="vLLM is not installed"):
        VLLMBackend(tiny_model_dir, adapter=lora_dir)
