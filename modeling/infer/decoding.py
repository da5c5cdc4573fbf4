"""Personalized responses from a local model: the local engine.

``generate_personalized`` is the local engine. Every prompt of one user shares its text up to the final
``## Question`` (the few-shot examples and the ``# Task`` section), so with ``reuse_prefix`` that shared
prefix (the token ids all the user's prompts start with) runs through the model once; its KV cache is
copied into every row of a batch of questions (in buffers sized for the whole generation, so decoding
never re-copies the cache), only each question's suffix (question, headers) is run on top of it, and a
batched decode loop writes the replies (``modeling.infer.prefix_cache``). ``reuse_prefix=False`` is the
baseline: batched ``model.generate`` on each full prompt. The output is the same either way (tested for
greedy and seeded sampling, on the tiny model and on SmolLM2 with a LoRA adapter). ``generate_for_users``
does several users in one call (an evaluation: many users, one or a few questions each): users with two
or more questions reuse their prefix, and the remaining prompts of all users are batched together.

Prompts are encoded by ``modeling.llm.fspo_prompt_ids``, exactly as training encodes them: plain
Markdown with the document BOS, or (``chat_template``) wrapped in the model's chat template. A prompt
that does not fit the model's context with its ``max_new_tokens`` drops its earliest shots until it does
(``Generation.shots_cut``; ``modeling.infer.fitting``), as training does. Models whose KV cache is not
plain full attention (sliding-window layers: Gemma 2/3, Mistral with ``sliding_window``) always take the
plain path.

The types every back end shares (``UserQuestions``, ``Generation``, ``finish_generation``,
``question_seed``) live in ``modeling.infer.generation``; they, ``fit_to_context`` and the decode loop
(``_Decoder``) stay importable from here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data import Pair
from ..llm import ProgressFn, context_length, fspo_prompt_ids, generate_ids
from .fitting import FittedPrompts, fit_to_context
from .generation import (
    Generation,
    GenerationStats,
    UserQuestions,
    _check_decoding,
    finish_generation,
    question_seed,
)
from .prefix_cache import _Decoder, _prefill_prefix, _prefix_cache_problem, _Sampling, _shared_prefix_length

logger = logging.getLogger(__name__)


def generate_personalized(
    model: Any,
    tokenizer: Any,
    shots: Sequence[Pair],
    questions: Sequence[str],
    *,
    instruction: str,
    cot: bool = False,
    description: str | None = None,
    chat_template: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    reuse_prefix: bool = True,
    batch_size: int = 8,
    stats: GenerationStats | None = None,
    progress: ProgressFn | None = None,
) -> list[Generation]:
    """Generate one response per question for the user whose picks are ``shots``.

    Prompts are ``UserQuestions.prompts`` encoded by ``fspo_prompt_ids``: plain Markdown with the
    document BOS once, or with ``chat_template`` (a checkpoint trained with ``TrainConfig.chat_template``)
    the model's chat template around it. ``temperature == 0`` is greedy; otherwise each row samples with
    its own ``torch.Generator`` seeded from ``seed`` and its question (``question_seed``; None: the
    global torch RNG), so a seeded reply does not depend on what else is asked or batched with it.

    ``reuse_prefix`` runs the shared few-shot prefix once (see the module docstring; a lone question
    is simply run whole); the output is the same without it. A prompt longer than the model's context
    (with ``max_new_tokens``) drops its earliest shots (``Generation.shots_cut``). ``stats`` (if given)
    is filled with token accounting; ``progress(done, total)`` is called after each batch. The model is
    used as is (eval mode, adapters as set by the caller)."""
    user = UserQuestions(tuple(shots), tuple(questions), instruction, description)
    return generate_for_users(
        model,
        tokenizer,
        [user],
        cot=cot,
        chat_template=chat_template,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        reuse_prefix=reuse_prefix,
        batch_size=batch_size,
        stats=stats,
        progress=progress,
    )[0]


def generate_for_users(
    model: Any,
    tokenizer: Any,
    users: Sequence[UserQuestions],
    *,
    cot: bool = False,
    chat_template: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    reuse_prefix: bool = True,
    batch_size: int = 8,
    stats: GenerationStats | None = None,
    progress: ProgressFn | None = None,
) -> list[list[Generation]]:
    """``generate_personalized`` for several users in one call: each user's generations, in order.

    A user with two or more questions (that keep the same shots) has their shared prefix run once;
    every other prompt (lone questions of many users, everything with ``reuse_prefix=False`` or on a
    model whose cache cannot be reused) goes through plain batched ``generate``, shortest prompts
    together to limit padding."""
    _check_decoding(max_new_tokens, temperature, top_p, seed)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not users:
        return []
    fitted = fit_to_context(
        users,
        lambda text: fspo_prompt_ids(tokenizer, text, chat_template=chat_template),
        context_length(model),
        max_new_tokens,
        cot=cot,
    )
    questions = [q for user in fitted.users for q in user.questions]
    run = _LocalRun(
        model,
        _Decoder(model, tokenizer),
        fitted.ids,
        [_Sampling(temperature, top_p, question_seed(seed, q)) for q in questions],
        max_new_tokens,
        batch_size,
        stats if stats is not None else GenerationStats(),
        progress,
    )
    run.count_prompts(fitted.shots_cut)
    prefixed, plain = _plan_prefix_reuse(model, fitted, reuse_prefix, run.stats)
    for idx, cut in prefixed:
        run.on_prefix(idx, cut)
    run.plain(plain)
    return fitted.restore(run.generations(fitted, cot=cot), users)


def _plan_prefix_reuse(
    model: Any, fitted: FittedPrompts, reuse_prefix: bool, stats: GenerationStats
) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Which prompts run on a shared prefix and which go through plain ``generate``.

    Returns (the (prompt indices, prefix length) of each user whose questions share a prefix, in user
    order; every other prompt's index). A user's questions share a prefix when there are two or more, the
    model's cache can be reused (else they count as ``stats.fallbacks``) and their ids share a start."""
    cache_problem = _prefix_cache_problem(model) if reuse_prefix else None
    prefixed: list[tuple[list[int], int]] = []
    plain: list[int] = []
    start = 0
    for user in fitted.users:
        idx = list(range(start, start + len(user.questions)))
        start += len(idx)
        if not reuse_prefix or len(idx) < 2:
            plain += idx
            continue
        if cache_problem is not None:
            _log_once(f"{type(model).__name__}: {cache_problem}; generating from full prompts")
            stats.fallbacks += len(idx)
            plain += idx
            continue
        cut = _shared_prefix_length([fitted.ids[i] for i in idx])
        if cut == 0:
            plain += idx
            continue
        prefixed.append((idx, cut))
    return prefixed, plain


@dataclass
class _LocalRun:
    """One ``generate_for_users`` call: every prompt's ids and sampling, and each one's raw result,
    (new ids, finish reason, cached prompt tokens), filled batch by batch."""

    model: Any
    decoder: _Decoder
    ids: list[list[int]]
    samplings: list[_Sampling]
    max_new_tokens: int
    batch_size: int
    stats: GenerationStats
    progress: ProgressFn | None
    raw: list[tuple[list[int], str, int] | None] = dataclasses.field(default_factory=list)
    done: int = 0

    def __post_init__(self) -> None:
        self.raw = [None] * len(self.ids)

    def count_prompts(self, shots_cut: list[int]) -> None:
        self.stats.questions += len(self.ids)
        self.stats.prompt_tokens += sum(len(ids) for ids in self.ids)
        self.stats.shots_cut += sum(shots_cut)
        self.stats.prompts_cut += sum(1 for c in shots_cut if c)

    def on_prefix(self, idx: list[int], cut: int) -> None:
        """Run the prompts ``idx``'s shared first ``cut`` ids once, then decode them in batches on it."""
        import torch

        prefix_ids = self.ids[idx[0]][:cut]
        with torch.inference_mode():
            prefix_kv = _prefill_prefix(self.model, prefix_ids)
        self.stats.prefix_tokens += cut
        self.stats.prompt_tokens_computed += cut
        self.stats.reused += len(idx)
        for b in range(0, len(idx), self.batch_size):
            batch = idx[b : b + self.batch_size]
            rows = [self.ids[i][cut:] for i in batch]
            with torch.inference_mode():
                outputs = self.decoder.decode_on_prefix(
                    prefix_kv, cut, rows, [self.samplings[i] for i in batch], self.max_new_tokens
                )
            self.stats.prompt_tokens_computed += len(batch) * max(len(r) for r in rows)
            self._record(batch, outputs, cut)

    def plain(self, idx: list[int]) -> None:
        """Run the prompts ``idx`` whole through batched ``generate``, shortest prompts together."""
        idx = sorted(idx, key=lambda i: len(self.ids[i]))
        for b in range(0, len(idx), self.batch_size):
            batch = idx[b : b + self.batch_size]
            outputs = generate_ids(
                self.model,
                [self.ids[i] for i in batch],
                [self.samplings[i] for i in batch],
                self.max_new_tokens,
                stop_ids=self.decoder.stop_ids,
                pad_id=self.decoder.pad_id,
            )
            self.stats.prompt_tokens_computed += len(batch) * max(len(self.ids[i]) for i in batch)
            self._record(batch, outputs, 0)

    def _record(self, batch: list[int], outputs: list[tuple[list[int], str]], cached: int) -> None:
        for i, (ids, finish) in zip(batch, outputs, strict=True):
            self.raw[i] = (ids, finish, cached)
        self.done += len(batch)
        if self.progress is not None:
            self.progress(self.done, len(self.ids))

    def generations(self, fitted: FittedPrompts, *, cot: bool) -> list[Generation]:
        """Every prompt's ``Generation``, in the order of ``fitted``'s prompts."""
        descriptions = [user.description for user in fitted.users for _ in user.questions]
        flat = []
        for i, item in enumerate(self.raw):
            assert item is not None
            ids, finish, cached = item
            new_tokens = len(ids) + (finish == "stop")
            self.stats.new_tokens += new_tokens
            flat.append(
                finish_generation(
                    self.decoder.decode(ids),
                    cot=cot,
                    description=descriptions[i],
                    prompt_tokens=len(self.ids[i]),
                    new_tokens=new_tokens,
                    cached_tokens=cached,
                    finish_reason=finish,
                    shots_cut=fitted.shots_cut[i],
                )
            )
        return flat


@functools.cache
def _log_once(message: str) -> None:
    logger.warning(message)
