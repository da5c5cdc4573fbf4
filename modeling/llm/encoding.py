"""How an FSPO prompt becomes token ids, the same in training and in generation: plain Markdown after
the document BOS, or wrapped in the model's chat template."""

from __future__ import annotations

from typing import Any

from .chat import LLMError


def document_bos_id(tokenizer: Any) -> int | None:
    """The token that starts a plain-text document for this tokenizer, or None.

    The tokenizer's BOS, unless that token is a chat-format turn marker rather than a document start:
    SmolLM2 declares ``<|im_start|>`` as its BOS, and a Markdown FSPO prompt that began with it would
    read as an unfinished chat turn. A BOS written literally in the chat template is such a marker (a
    real document start is written ``{{ bos_token }}``, as Llama's, Gemma's and the tiny model's
    templates do), unless the tokenizer says it adds the BOS itself (``add_bos_token``)."""
    bos, text = tokenizer.bos_token_id, tokenizer.bos_token
    if bos is None:
        return None
    if getattr(tokenizer, "add_bos_token", None) is True:
        return bos
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and text and text in template:
        return None
    return bos


def plain_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a plain-text prompt (no chat template): the document BOS (``document_bos_id``) if
    the tokenizer has one, exactly once, then the text's tokens. This is how ``fspo train`` encodes
    FSPO prompts."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = document_bos_id(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def chat_wrapped(tokenizer: Any, text: str) -> str:
    """``text`` as the one user turn of the tokenizer's chat template, ready for the assistant's reply
    (the option ``TrainConfig.chat_template``; by default FSPO prompts are plain Markdown, as in the
    paper)."""
    if not getattr(tokenizer, "chat_template", None):
        raise LLMError("chat_template was asked for, but this tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def fspo_prompt_ids(tokenizer: Any, text: str, *, chat_template: bool = False) -> list[int]:
    """Token ids of an FSPO prompt as training and generation both encode it: plain text with the
    document BOS (``plain_prompt_ids``), or wrapped in the model's chat template (which writes any
    special tokens it wants itself)."""
    if not chat_template:
        return plain_prompt_ids(tokenizer, text)
    return list(tokenizer(chat_wrapped(tokenizer, text), add_special_tokens=False)["input_ids"])
