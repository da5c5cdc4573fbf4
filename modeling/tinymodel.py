"""Tiny real models built offline: a byte-level BPE tokenizer trained on local text and a
randomly initialised Llama-architecture causal LM.

They are small enough for CPU tests and the embedded demo, and they load with the same
``AutoTokenizer`` / ``AutoModelForCausalLM`` calls as a real checkpoint, so every code path that
serves a 3B model also runs on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]

# Renders OpenAI-style messages as Markdown-ish sections:
#   ### System:\n...\n### User:\n...\n### Assistant:\n
# An assistant turn in the history ends with EOS so a model trained on rendered chats learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "### {{ message['role'] | capitalize }}:\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    # An explicit newline expression: HF renders templates with trim_blocks, which eats a literal
    # newline right after a block tag.
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and save it (with a chat template) to ``out_dir``.

    Byte-level means every string round-trips, whatever the training text covered. The vocabulary
    may come out smaller than ``vocab_size`` when the text has fewer distinct merges.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}"
        )
    out_dir = Path(out_dir)
    bpe = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    if bpe.get_vocab_size() <= 256 + len(SPECIAL_TOKENS):
        raise ValueError("cannot train a tokenizer: the given texts are empty")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        # Streaming decodes a growing prefix; clean-up would rewrite " ." to "." and break that.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# The demo's tiny decoder (``TrainConfig.tiny``'s default shape): every other caller names what differs.
TINY_SHAPE = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384}


def tiny_llama(
    *,
    vocab_size: int,
    hidden_size: int = TINY_SHAPE["hidden_size"],
    num_layers: int = TINY_SHAPE["num_layers"],
    num_heads: int = TINY_SHAPE["num_heads"],
    num_kv_heads: int | None = None,
    intermediate_size: int = TINY_SHAPE["intermediate_size"],
    max_position_embeddings: int | None = None,
    tie_word_embeddings: bool = True,
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    private_rng: bool = True,
    **config: Any,
) -> LlamaForCausalLM:
    """The one tiny Llama-architecture causal LM, randomly initialised from ``seed``.

    The defaults are the demo's base model (``fspo train --stage pretrain``): tied input and output
    embeddings, as many key/value heads as query heads (``num_kv_heads`` sets grouped-query attention).
    ``tokenizer`` puts its BOS / EOS / pad ids into the config (the pad id also zeroes its embedding
    row); without one they are LlamaConfig's. ``max_position_embeddings`` None keeps LlamaConfig's
    (2048). Any other LlamaConfig field (``initializer_range``, ``attn_implementation``,
    ``attention_dropout``, ...) passes through ``config``.

    ``private_rng``: seed a forked RNG stream, so building never perturbs the caller's global RNG;
    False seeds the global generator itself (``torch.manual_seed(seed)``), which training then
    continues from.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if tokenizer is not None:
        config.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    if max_position_embeddings is not None:
        config["max_position_embeddings"] = max_position_embeddings
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads if num_kv_heads is None else num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
        **config,
    )
    if not private_rng:
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama)


def build_tiny_causal_lm(
    out_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Save a :func:`tiny_llama` (smaller than the demo's by default, with untied embeddings, built on
    a private RNG stream) and ``tokenizer`` to ``out_dir``.

    The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
    ``AutoTokenizer.from_pretrained(out_dir)``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    model = tiny_llama(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        tokenizer=tokenizer,
        seed=seed,
    )
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.model_max_length = max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    return out_dir


def random_lora_adapter(model_dir: str | Path, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save a LoRA adapter of the model in ``model_dir`` shaped as ``fspo train --lora`` makes them (r 16,
    alpha 32, every linear layer) whose B matrices are random (scale 0.1; peft zero-inits them), so that
    it changes the model's outputs, to ``out_dir``. For tests and benches of the adapter paths
    (merging, serving by name, batching arms) without a training run. Returns ``out_dir``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)
