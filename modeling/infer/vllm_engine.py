"""vLLM's offline engine as the personalization back ends share it: one engine per base model in a
process (``vllm_engine``), every arm's LoRA adapter a ``LoRARequest`` on it, its automatic prefix caching
on, and the pure part that turns users' questions into the engine's inputs (``engine_requests``).

vLLM is an optional extra (``pip install 'fspo-studies[vllm]'``, GPU hosts): nothing here imports it
until an engine is made, so everything but ``vllm_engine`` runs (and is tested) without it.

Prefix caching pays because of the FSPO prompt's order (``modeling.data.build_prompt``): the
participant's few-shot block (``# Example 1`` ...) comes first, then the task and the question, so every
question of one participant shares the tokens of their shots and vLLM computes them once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..llm import LLMError
from .fitting import FittedPrompts, fit_to_context
from .generation import UserQuestions, question_seed

VLLM_MISSING = "vLLM is not installed: pip install 'fspo-studies[vllm]' on a GPU host"

# What a shared engine is made with unless told otherwise: prefix caching (the shots computed once per
# participant), LoRA on (any arm's adapter can be served without loading the base again), room for a
# study's arms' adapters in one batch (vLLM's default is 1), and ranks up to 64 (its default is 16;
# `fspo train --lora` defaults to 16).
ENGINE_DEFAULTS: Mapping[str, Any] = {
    "enable_prefix_caching": True,
    "enable_lora": True,
    "max_loras": 4,
    "max_lora_rank": 64,
}


def engine_options(**engine_kwargs: Any) -> dict[str, Any]:
    """The keyword arguments ``vllm.LLM`` gets: ``ENGINE_DEFAULTS`` under the caller's."""
    return {**ENGINE_DEFAULTS, **engine_kwargs}


def engine_key(model_dir: Path, options: Mapping[str, Any]) -> tuple[str, str]:
    """What makes two engines the same: the base model's real directory and the options (in any
    order)."""
    return str(Path(model_dir).resolve()), json.dumps(dict(options), sort_keys=True, default=str)


def adapter_rank(adapter: Path) -> int:
    """A peft LoRA adapter's rank (``r`` in its ``adapter_config.json``)."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
        return int(config["r"])
    except (OSError, ValueError, KeyError, TypeError):
        raise LLMError(f"cannot load adapter: {adapter}/adapter_config.json has no LoRA rank 'r'") from None


@dataclass
class LoRAIds:
    """The positive integer ids an engine knows its adapters by (vLLM needs one unique per adapter):
    1, 2, ... in the order adapters are first asked for; one adapter directory, however spelled, one id."""

    ids: dict[str, int] = field(default_factory=dict)

    def id_of(self, adapter: Path) -> int:
        return self.ids.setdefault(str(Path(adapter).resolve()), len(self.ids) + 1)


@dataclass(frozen=True)
class EngineRequest:
    """One prompt as the engine gets it: its token ids, its sampling settings (``vllm.SamplingParams``'
    fields), and what post-processing needs (the description given, the shots cut to fit)."""

    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    description: str | None
    shots_cut: int


def engine_requests(
    users: Sequence[UserQuestions],
    encode: Callable[[str], list[int]],
    *,
    max_model_len: int | None,
    cot: bool,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
) -> tuple[list[EngineRequest], FittedPrompts]:
    """Every question of every user as an engine request, encoded by ``encode`` (``fspo_prompt_ids``)
    with the earliest shots cut from a prompt too long for ``max_model_len`` (``fit_to_context``), each
    seeded by its question (``question_seed``); and the fitted prompts, whose ``restore`` puts the
    generations back in the users' order. A user's questions stay together, so they reach the engine one
    after another with the same few-shot prefix."""
    fitted = fit_to_context(users, encode, max_model_len, max_new_tokens, cot=cot)
    requests = []
    flat = 0
    for user in fitted.users:
        for question in user.questions:
            requests.append(
                EngineRequest(
                    prompt_token_ids=fitted.ids[flat],
                    max_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=question_seed(seed, question),
                    description=user.description,
                    shots_cut=fitted.shots_cut[flat],
                )
            )
            flat += 1
    return requests, fitted


@dataclass
class VLLMEngine:
    """One ``vllm.LLM`` and the ids of the adapters it has been asked to serve. ``lock`` serialises
    ``generate`` calls (the offline engine is not for concurrent callers)."""

    llm: Any
    lora_ids: LoRAIds = field(default_factory=LoRAIds)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def lora_request(self, adapter: Path | None) -> Any:
        """The ``LoRARequest`` of an adapter directory on this engine (None: the base model)."""
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        path = str(Path(adapter).resolve())
        return LoRARequest(path, self.lora_ids.id_of(Path(path)), path)


_engines: dict[tuple[str, str], VLLMEngine] = {}
_engines_lock = threading.Lock()


def vllm_engine(model_dir: Path, **engine_kwargs: Any) -> VLLMEngine:
    """The process's engine for the base model ``model_dir`` with these options (``engine_options``),
    made the first time it is asked for and shared by every back end after: a worker serving several
    arms of one base holds its weights once. LLMError ``VLLM_MISSING`` without vLLM."""
    options = engine_options(**engine_kwargs)
    key = engine_key(model_dir, options)
    with _engines_lock:
        if key not in _engines:
            try:
                import vllm
            except ImportError:
                raise LLMError(VLLM_MISSING) from None
            _engines[key] = VLLMEngine(vllm.LLM(model=str(model_dir), **options))
        return _engines[key]
