"""Personalized responses from a local model, and the types every back end shares.

``UserQuestions`` is one user's few-shot picks and the questions to answer for them, rendered as FSPO
prompts; ``Generation`` is one response; ``finish_generation`` and ``question_seed`` make every back end
(``modeling.infer.backends``) post-process and seed the same way, so their outputs compare exactly.

``generate_personalized`` is the local engine. Every prompt of one user shares its text up to the final
``## Question`` (the few-shot examples and the ``# Task`` section), so with ``reuse_prefix`` that shared
prefix runs through the model once; its KV cache is copied into every row of a batch of questions (in
buffers sized for the whole generation, so decoding never re-copies the cache), only each question's
suffix (question, headers) is run on top of it, and a batched decode loop writes the replies.
``reuse_prefix=False`` is the baseline: batched ``model.generate`` on each full prompt. The output is
the same either way (tested for greedy and seeded sampling). ``generate_for_users`` does several users
in one call (an evaluation: many users, one or a few questions each): users with two or more questions
reuse their prefix, and the remaining prompts of all users are batched together.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data import Pair, build_cot_prompt, build_prompt, split_cot_output
from ..llm import (
    LLMError,
    ProgressFn,
    TextRequest,
    context_length,
    generate_ids,
    pad_token_id,
    plain_prompt_ids,
    row_generator,
    sample_token,
    stop_token_ids,
)


@dataclass(frozen=True)
class Generation:
    """One personalized response.

    text: the response (stripped).
    description: the user description that preceded the response: the model's own with CoT, the given
        one with ``description``, otherwise None.
    prompt_tokens: length of the full prompt in tokens (BOS included).
    new_tokens: tokens generated (the stop token included, as OpenAI counts).
    cached_tokens: prompt tokens that came from the shared-prefix cache instead of being run again.
    finish_reason: "stop" (EOS) or "length" (``max_new_tokens`` reached).
    """

    text: str
    description: str | None
    prompt_tokens: int
    new_tokens: int
    cached_tokens: int = 0
    finish_reason: str = "stop"


@dataclass
class GenerationStats:
    """What one local generation call computed (pass one in to have it filled).

    prompt_tokens: total length of all prompts (what a run without prefix reuse has to process).
    prompt_tokens_computed: prompt positions actually run through the model, padding included.
    prefix_tokens: length of the shared prefixes that were reused (each run once).
    reused: questions generated on top of a prefix cache.
    fallbacks: questions whose prompt did not tokenize as prefix + suffix at the cut, so they were
        generated from their full prompt instead.
    new_tokens: tokens generated over all questions.
    """

    questions: int = 0
    prompt_tokens: int = 0
    prompt_tokens_computed: int = 0
    prefix_tokens: int = 0
    reused: int = 0
    fallbacks: int = 0
    new_tokens: int = 0


@dataclass(frozen=True)
class UserQuestions:
    """One user's few-shot picks and the questions to answer for them.

    ``description`` (the oracle persona, or a teacher-forced one) goes into the prompt before the
    response header; without it, a CoT run lets the model write the description first."""

    shots: tuple[Pair, ...]
    questions: tuple[str, ...]
    instruction: str
    description: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shots", tuple(self.shots))
        if isinstance(self.questions, str) or not self.questions:
            raise ValueError("questions must be a non-empty list of strings")
        object.__setattr__(self, "questions", tuple(self.questions))
        for i, q in enumerate(self.questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"questions[{i}] must be a non-empty string")

    def prompts(self, *, cot: bool = False) -> list[str]:
        """The FSPO prompt of each question, exactly as training renders it (``modeling.data``)."""
        if self.description is not None:
            return [
                build_prompt(self.shots, q, instruction=self.instruction, description=self.description)
                for q in self.questions
            ]
        if cot:
            return [build_cot_prompt(self.shots, q, instruction=self.instruction) for q in self.questions]
        return [build_prompt(self.shots, q, instruction=self.instruction) for q in self.questions]


def finish_generation(
    text: str,
    *,
    cot: bool,
    description: str | None,
    prompt_tokens: int,
    new_tokens: int,
    cached_tokens: int = 0,
    finish_reason: str = "stop",
) -> Generation:
    """A Generation from a model's raw continuation of a ``UserQuestions`` prompt: every back end
    post-processes the same way, so their texts compare exactly."""
    if description is not None:
        predicted, response = description.strip(), text.strip()
    elif cot:
        predicted, response = split_cot_output(text)
    else:
        predicted, response = None, text.strip()
    return Generation(response, predicted, prompt_tokens, new_tokens, cached_tokens, finish_reason)


def question_seed(seed: int | None, question: str) -> int | None:
    """The sampling seed of one question: derived from ``seed`` and the question's text, so a seeded
    reply is the same whatever else is asked with it (or in which order), while different questions
    draw from different random streams. Every back end uses it."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}\x00{question.strip()}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF  # 31 bits: a valid seed for any server


def _check_decoding(max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> None:
    # TextRequest validates exactly these fields the way the HTTP and chat paths do.
    TextRequest("", max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


def _regroup(users: Sequence[UserQuestions], flat: list[Generation]) -> list[list[Generation]]:
    out, start = [], 0
    for user in users:
        out.append(flat[start : start + len(user.questions)])
        start += len(user.questions)
    return out


# ---------------------------------------------------------------------------------------------------
# The local engine


def generate_personalized(
    model: Any,
    tokenizer: Any,
    shots: Sequence[Pair],
    questions: Sequence[str],
    *,
    instruction: str,
    cot: bool = False,
    description: str | None = None,
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

    Prompts are ``UserQuestions.prompts`` (plain Markdown, no chat template), encoded with the
    tokenizer's BOS once. ``temperature == 0`` is greedy; otherwise each row samples with its own
    ``torch.Generator`` seeded from ``seed`` and its question (``question_seed``; None: the global
    torch RNG), so a seeded reply does not depend on what else is asked or batched with it.

    ``reuse_prefix`` runs the shared few-shot prefix once (see the module docstring; a lone question
    is simply run whole); the output is the same without it. ``stats`` (if given) is filled with token
    accounting; ``progress(done, total)`` is called after each batch. The model is used as is (eval
    mode, adapters as set by the caller)."""
    user = UserQuestions(tuple(shots), tuple(questions), instruction, description)
    return generate_for_users(
        model,
        tokenizer,
        [user],
        cot=cot,
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

    A user with two or more questions has their shared prefix run once; every other prompt (lone
    questions of many users, tokenization fallbacks, everything with ``reuse_prefix=False``) goes
    through plain batched ``generate``, shortest prompts together to limit padding."""
    import torch

    _check_decoding(max_new_tokens, temperature, top_p, seed)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not users:
        return []
    prompts = [p for user in users for p in user.prompts(cot=cot)]
    questions = [q for user in users for q in user.questions]
    descriptions = [user.description for user in users for _ in user.questions]
    full_ids = [plain_prompt_ids(tokenizer, p) for p in prompts]
    limit = context_length(model)
    longest = max(len(ids) for ids in full_ids)
    if limit is not None and longest + max_new_tokens > limit:
        raise LLMError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of {limit} tokens"
        )
    decoder = _Decoder(model, tokenizer)
    samplings = [_Sampling(temperature, top_p, question_seed(seed, q)) for q in questions]
    stats = stats if stats is not None else GenerationStats()
    stats.questions += len(prompts)
    stats.prompt_tokens += sum(len(ids) for ids in full_ids)
    raw: list[tuple[list[int], str, int] | None] = [None] * len(prompts)  # (new ids, finish, cached)
    total, done = len(prompts), 0

    plain: list[int] = []
    start = 0
    for user in users:
        idx = list(range(start, start + len(user.questions)))
        start += len(idx)
        if not reuse_prefix or len(idx) < 2:
            plain += idx
            continue
        prefix_ids, suffixes = _split_at_shared_prefix(
            tokenizer, user.shots, user.instruction, [prompts[i] for i in idx], [full_ids[i] for i in idx]
        )
        reusable = [(i, s) for i, s in zip(idx, suffixes, strict=True) if s is not None]
        fallbacks = [i for i, s in zip(idx, suffixes, strict=True) if s is None]
        stats.fallbacks += len(fallbacks)
        plain += fallbacks
        if len(reusable) < 2 or not _prefix_cache_supported(model):
            plain += [i for i, _ in reusable]
            continue
        with torch.inference_mode():
            prefix_kv = _prefill_prefix(model, prefix_ids)
        stats.prefix_tokens += len(prefix_ids)
        stats.prompt_tokens_computed += len(prefix_ids)
        stats.reused += len(reusable)
        for b in range(0, len(reusable), batch_size):
            batch = [i for i, _ in reusable[b : b + batch_size]]
            rows = [s for _, s in reusable[b : b + batch_size]]
            with torch.inference_mode():
                outputs = decoder.decode_on_prefix(
                    prefix_kv, len(prefix_ids), rows, [samplings[i] for i in batch], max_new_tokens
                )
            stats.prompt_tokens_computed += len(batch) * max(len(r) for r in rows)
            for i, (ids, finish) in zip(batch, outputs, strict=True):
                raw[i] = (ids, finish, len(prefix_ids))
            done += len(batch)
            if progress is not None:
                progress(done, total)

    plain.sort(key=lambda i: len(full_ids[i]))
    for b in range(0, len(plain), batch_size):
        batch = plain[b : b + batch_size]
        outputs = generate_ids(
            model,
            [full_ids[i] for i in batch],
            [samplings[i] for i in batch],
            max_new_tokens,
            stop_ids=decoder.stop_ids,
            pad_id=decoder.pad_id,
        )
        stats.prompt_tokens_computed += len(batch) * max(len(full_ids[i]) for i in batch)
        for i, (ids, finish) in zip(batch, outputs, strict=True):
            raw[i] = (ids, finish, 0)
        done += len(batch)
        if progress is not None:
            progress(done, total)

    flat = []
    for i, item in enumerate(raw):
        assert item is not None
        ids, finish, cached = item
        new_tokens = len(ids) + (finish == "stop")
        stats.new_tokens += new_tokens
        flat.append(
            finish_generation(
                decoder.decode(ids),
                cot=cot,
                description=descriptions[i],
                prompt_tokens=len(full_ids[i]),
                new_tokens=new_tokens,
                cached_tokens=cached,
                finish_reason=finish,
            )
        )
    return _regroup(users, flat)


def _split_at_shared_prefix(
    tokenizer: Any, shots: Sequence[Pair], instruction: str, prompts: list[str], full_ids: list[list[int]]
) -> tuple[list[int], list[list[int] | None]]:
    """(prefix ids, each prompt's suffix ids or None where the cut does not tokenize cleanly).

    The prefix is the prompt text before the question, which ends with ``## Question\\n``, so the cut
    sits at a newline. BPE tokenizers (GPT-2 / Llama 3 style) never merge a newline with the letter
    after it, so ids(prefix) + ids(suffix) == ids(prompt) and reusing the prefix's KV cache is exact;
    a tokenizer for which that fails for a prompt (e.g. SentencePiece adding a leading space to the
    suffix) gets that prompt generated from its full ids instead."""
    marker = f"\x00{uuid.uuid4().hex}\x00"
    probe = build_prompt(shots, marker, instruction=instruction)
    prefix = probe[: probe.index(marker)]
    prefix = prefix[: prefix.rfind("\n") + 1]  # a newline boundary even if the format changes
    prefix_ids = plain_prompt_ids(tokenizer, prefix)
    suffixes: list[list[int] | None] = []
    for text, ids in zip(prompts, full_ids, strict=True):
        suffix = None
        if text.startswith(prefix) and len(text) > len(prefix):
            candidate = list(tokenizer(text[len(prefix) :], add_special_tokens=False)["input_ids"])
            if candidate and prefix_ids + candidate == ids:
                suffix = candidate
        suffixes.append(suffix)
    return prefix_ids, suffixes


def _prefix_cache_supported(model: Any) -> bool:
    """Prefix reuse expands plain full-attention KV layers; sliding-window, linear-attention or
    quantized caches (Mistral, Gemma, hybrids) take the plain path."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def _prefill_prefix(model: Any, prefix_ids: list[int]) -> list[tuple[Any, Any]]:
    """Run the shared prefix once (batch of 1); its per-layer (keys, values)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    input_ids = torch.tensor([prefix_ids], dtype=torch.long, device=model.device)
    # Only the cache is wanted; logits_to_keep=1 avoids a (prefix x vocab) logits tensor.
    model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


@functools.cache
def _preallocated_layer_class() -> type:
    """Defined on first use, so importing this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A full-attention KV layer in a buffer allocated once for the whole generation.

        It behaves as ``DynamicLayer`` (keys/values are the first ``length`` positions), but an update
        writes in place instead of concatenating: ``DynamicLayer`` copies the whole cache at every
        decoding step, which on a 2k-token prefix costs more than the step's compute."""

        is_croppable = False

        def __init__(self, keys: Any, values: Any, batch: int, capacity: int) -> None:
            super().__init__()
            _, heads, length, _ = keys.shape
            self._k = keys.new_empty((batch, heads, capacity, keys.shape[-1]))
            self._v = values.new_empty((batch, values.shape[1], capacity, values.shape[-1]))
            self._k[:, :, :length] = keys  # broadcasts the batch-of-1 prefix to every row
            self._v[:, :, :length] = values
            self.length = length
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self._refresh()

        def _refresh(self) -> None:
            self.keys = self._k[:, :, : self.length]
            self.values = self._v[:, :, : self.length]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            n, m = self.length, key_states.shape[-2]
            self._k[:, :, n : n + m] = key_states
            self._v[:, :, n : n + m] = value_states
            self.length = n + m
            self._refresh()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Any) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._refresh()

    return PreallocatedLayer


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_p: float
    seed: int | None


class _Decoder:
    """The decode loop on top of a shared prefix cache."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.stop_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def decode_on_prefix(
        self,
        prefix_kv: list[tuple[Any, Any]],
        prefix_len: int,
        suffixes: list[list[int]],
        samplings: list[_Sampling],
        max_new_tokens: int,
    ) -> list[tuple[list[int], str]]:
        """Each suffix's new token ids (cut before the stop token) and finish reason.

        Layout of row r after the suffix step (P = prefix length, L = longest suffix), in a KV buffer
        allocated once for P + L + max_new_tokens positions:
            cache:     [ prefix (P) | suffix_r, right-padded to L | new tokens ... ]
            positions:   0 .. P-1     P .. P+len_r-1, pads masked   P+len_r, P+len_r+1, ...
        Right padding keeps every row's real tokens at contiguous positions (RoPE sees exactly the
        positions of the unpadded prompt); the pads sit inside the cache but the attention mask hides
        them from every later query. Causal masking follows the cache index, which is the same for all
        rows, so only the per-row position ids and the mask differ between rows."""
        import torch
        from transformers.cache_utils import Cache

        model, device = self.model, self.model.device
        b = len(suffixes)
        lengths = torch.tensor([len(s) for s in suffixes], device=device)
        width = int(lengths.max())
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long, device=device)
        suffix_mask = torch.zeros((b, width), dtype=torch.long, device=device)
        for row, ids in enumerate(suffixes):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
            suffix_mask[row, : len(ids)] = 1
        # Each row gets a copy of the prefix cache in a buffer sized for the whole generation; the
        # prefix tensors themselves are never written to and serve every batch.
        capacity = prefix_len + width + max_new_tokens
        layer = _preallocated_layer_class()
        cache = Cache(layers=[layer(k, v, b, capacity) for k, v in prefix_kv])
        attention_mask = torch.cat(
            [torch.ones((b, prefix_len), dtype=torch.long, device=device), suffix_mask], 1
        )
        positions = torch.arange(prefix_len, prefix_len + width, device=device).expand(b, -1)
        # Only each row's last real suffix position predicts its first new token.
        last = lengths - 1
        keep, where = torch.unique(last, return_inverse=True)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits
        logits = logits[torch.arange(b, device=device), where]  # (b, vocab)

        generators = [row_generator(s.seed, device) for s in samplings]
        new_ids: list[list[int]] = [[] for _ in range(b)]
        finish = ["length"] * b
        active = list(range(b))  # batch row of each live row
        next_pos = prefix_len + lengths  # per live row: the position of its next token
        for step in range(max_new_tokens):
            tokens = self._pick(logits, [samplings[r] for r in active], [generators[r] for r in active])
            live = []
            for j, row in enumerate(active):
                token = int(tokens[j])
                if token in self.stop_ids:
                    finish[row] = "stop"
                else:
                    new_ids[row].append(token)
                    live.append(j)
            if not live or step == max_new_tokens - 1:
                break
            if len(live) < len(active):  # drop finished rows from the batch (and the cache)
                keep_rows = torch.tensor(live, device=device)
                cache.batch_select_indices(keep_rows)
                attention_mask, next_pos, tokens = (
                    attention_mask[keep_rows],
                    next_pos[keep_rows],
                    tokens[keep_rows],
                )
                active = [active[j] for j in live]
            attention_mask = torch.cat(
                [attention_mask, torch.ones((len(active), 1), dtype=torch.long, device=device)], 1
            )
            logits = model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            next_pos = next_pos + 1
        return [(ids, reason) for ids, reason in zip(new_ids, finish, strict=True)]

    def _pick(self, logits: Any, samplings: list[_Sampling], generators: list[Any]) -> Any:

        # Float32 like generate()'s scores, so greedy ties break the same way in both paths.
        logits = logits.float()
        picks = logits.argmax(-1)
        for j, (s, g) in enumerate(zip(samplings, generators, strict=True)):
            if s.temperature > 0:
                picks[j] = sample_token(logits[j], s.temperature, s.top_p, g)[0]
        return picks
