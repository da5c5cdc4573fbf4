"""Personalized generation on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, BOS
``<|im_start|>`` that plain prompts must not start with, EOS and pad ``<|im_end|>``, a chat template)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modeling.data import Pair
from modeling.infer import Generation, LocalBackend, UserQuestions, generate_for_users
from modeling.llm import LLMError, fspo_prompt_ids

INSTRUCTION = "Answer the question the way this user prefers."
USERS = [
    UserQuestions(
        (Pair("What is rain?", "Rain is water falling from clouds.", "Rain is when the sky cries."),),
        ("Why is the sky blue?", "What is snow?"),
        INSTRUCTION,
    ),
    UserQuestions(
        (
            Pair("What is a cat?", "A small furry pet.", "A feline mammal of the family Felidae."),
            Pair("What is a dog?", "A loyal pet.", "A canine."),
        ),
        ("What is a bird?", "What is a fish?"),
        INSTRUCTION,
    ),
]
NEW_TOKENS = 4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread for this module's 135M-parameter model: on a 2-core machine shared with other
    work, two threads spin against the other load and ran these tests 7x slower (170 s against 23 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(), AutoTokenizer.from_pretrained(
        smollm2_dir
    )


def hf_greedy(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    """Plain Hugging Face ``generate`` on one unpadded prompt: (reply text, new tokens, EOS included)."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, len(ids) :].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.strip(), len(new)


def replies(per_user: list[list[Generation]]) -> list[tuple[str, int]]:
    return [(g.text, g.new_tokens) for gens in per_user for g in gens]


@pytest.mark.slow
def test_the_prefix_cache_with_a_merged_lora_adapter_gives_plain_generates_greedy_tokens(
    smollm2_dir: Path, smollm2_lora_dir: Path, smollm2: tuple[Any, Any]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backend = LocalBackend(smollm2_dir, adapter=smollm2_lora_dir)
    generations = backend.generate_many(USERS, max_new_tokens=NEW_TOKENS)

    # The reference: Hugging Face generate, one prompt at a time, on the adapter as peft runs it.
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), smollm2_lora_dir)
    unmerged.eval()
    tokenizer = backend.tokenizer
    prompts = [fspo_prompt_ids(tokenizer, p) for user in USERS for p in user.prompts()]
    expected = [hf_greedy(unmerged, tokenizer, ids, NEW_TOKENS) for ids in prompts]
    base = replies(generate_for_users(*smollm2, USERS, max_new_tokens=NEW_TOKENS))

    assert replies(generations) == expected
    assert expected != base  # the adapter changes what the model says
    assert backend.last_stats.reused == 4 and backend.last_stats.prefix_tokens > 0
    assert backend.adapter_merged
    assert not any("lora" in name for name, _ in backend.model.named_modules())
    assert (
        tokenizer.bos_token_id not in prompts[0]
    )  # <|im_start|> is a chat turn marker, not a document start


def test_it_refuses_a_lora_adapter_trained_for_another_base_model(
    smollm2_dir: Path, lora_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(LLMError, match="a LoRA adapter for another base model"):
        LocalBackend(smollm2_dir, adapter=lora_dir)  # the tiny model's adapter

    # Its base no longer where it was trained (or a hub name): the adapter's weight shapes still tell.
    moved = tmp_path / "moved-adapter"
    shutil.copytree(lora_dir, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/tiny"}))
    with pytest.raises(
        LLMError, match=r"another base model \(model\.layers\.0\.self_attn\.\w_proj has input size 64"
    ):
        LocalBackend(smollm2_dir, adapter=moved)


def test_chat_wrapped_prompts_reuse_the_prefix_and_give_plain_generates_greedy_tokens(
    smollm2: tuple[Any, Any],
) -> None:
    model, tokenizer = smollm2
    generations = generate_for_users(model, tokenizer, USERS, chat_template=True, max_new_tokens=NEW_TOKENS)

    prompts = [fspo_prompt_ids(tokenizer, p, chat_template=True) for user in USERS for p in user.prompts()]
    assert replies(generations) == [hf_greedy(model, tokenizer, ids, NEW_TOKENS) for ids in prompts]
    assert tokenizer.decode(prompts[0]).startswith("<|im_start|>system\n")
    assert all(g.cached_tokens > 0 for gens in generations for g in gens)


def test_smollm2_stops_at_im_end_and_pads_with_it(smollm2: tuple[Any, Any]) -> None:
    from modeling.infer.decoding import _Decoder

    model, tokenizer = smollm2
    decoder = _Decoder(model, tokenizer)

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert decoder.stop_ids == {im_end}
    assert decoder.pad_id == im_end
