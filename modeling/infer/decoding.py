"""Personalized responses from a local model, and the types every back end shares.

``UserQuestions`` is one user's few-shot picks and the questions to answer for them, rendered as FSPO
prompts; ``Generation`` is one response; ``finish_generation`` and ``question_seed`` make every back end
(``modeling.infer.backends``) post-process and seed the same way, so their outputs compare exactly.

``generate_personalized`` is the local engine. Every prompt of one user shares its text up to the final
``## Question`` (the few-shot examples and the ``# Task`` section), so with ``reuse_prefix`` that shared
prefix (the token ids all the user's prompts start with) runs through the model once; its KV cache is copied into every row of a batch of questions (in
buffers sized for the whole generation, so decoding never re-copies the cache), only each question's
suffix (question, headers) is run on top of it, and a batched decode loop writes the replies.
``reuse_prefix=False`` is the baseline: batched ``model.generate`` on each full prompt. The output is
the same either way (tested for greedy and seeded sampling, on the tiny model and on SmolLM2 with a
LoRA adapter). ``generate_for_users`` does several users in one call (an evaluation: many users, one or
a few questions each): users with two or more questions reuse their prefix, and the remaining prompts
of all users are batched together.

Prompts are encoded by ``modeling.llm.fspo_prompt_ids``, exactly as training encodes them: plain
Markdown with the document BOS, or (``chat_template``) wrapped in the model's chat template. A prompt
that does not fit the model's context with its ``max_new_tokens`` drops its earliest shots until it does
(``Generation.shots_cut``), as training does. Models whose KV cache is not plain full attention
(sliding-window layers: Gemma 2/3, Mistral with ``sliding_window``) always take the plain path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..data import Pair, build_cot_prompt, build_prompt, split_cot_output
from ..llm import (
    LLMError,
    ProgressFn,
    TextRequest,
    context_length,
    fspo_prompt_ids,
    generate_ids,
    pad_token_id,
    row_generator,
    sample_token,
    stop_token_ids,
)

logger = logging.getLogger(__name__)


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
    shots_cut: the earliest shots dropped so that the prompt and ``max_new_tokens`` fit the model's
        context (0: the prompt holds every shot).
    """

    text: str
    description: str | None
    prompt_tokens: int
    new_tokens: int
    cached_tokens: int = 0
    finish_reason: str = "stop"
    shots_cut: int = 0


@dataclass
class GenerationStats:
    """What one local generation call computed (pass one in to have it filled).

    prompt_tokens: total length of all prompts (what a run without prefix reuse has to process).
    prompt_tokens_computed: prompt positions actually run through the model, padding included.
    prefix_tokens: length of the shared prefixes that were reused (each run once).
    reused: questions generated on top of a prefix cache.
    fallbacks: questions that shared a prefix with others of their user but went through plain
        ``generate`` because the model's KV cache cannot be reused that way (sliding-window layers).
    new_tokens: tokens generated over all questions.
    shots_cut: shots dropped from the start of prompts too long for the context, over all questions.
    prompts_cut: questions whose prompt lost at least one shot that way.
    """

    questions: int = 0
    prompt_tokens: int = 0
    prompt_tokens_computed: int = 0
    prefix_tokens: int = 0
    reused: int = 0
    fallbacks: int = 0
    new_tokens: int = 0
    shots_cut: int = 0
    prompts_cut: int = 0


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
    shots_cut: int = 0,
) -> Generation:
    """A Generation from a model's raw continuation of a ``UserQuestions`` prompt: every back end
    post-processes the same way, so their texts compare exactly."""
    if description is not None:
        predicted, response = description.strip(), text.strip()
    elif cot:
        predicted, response = split_cot_output(text)
    else:
        predicted, response = None, text.strip()
    return Generation(response, predicted, prompt_tokens, new_tokens, cached_tokens, finish_reason, shots_cut)


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


@dataclass
class FittedPrompts:
    """Users' prompts made to fit a context (``fit_to_context``), ready to encode once and generate.

    users: the users as they will be generated: one per (original user, number of shots kept), in
        order of first appearance, each with the questions that keep that many shots.
    ids: the token ids of every prompt of ``users``, flat, in that order.
    shots_cut: how many earliest shots each of those prompts lost (flat, same order).
    origin: for each of those prompts, its index among the original users' questions (flat).
    """

    users: list[UserQuestions]
    ids: list[list[int]]
    shots_cut: list[int]
    origin: list[int]

    def restore(self, flat: list[Generation], original: Sequence[UserQuestions]) -> list[list[Generation]]:
        """Generations in the order of ``users`` back to the original users' questions."""
        out: list[Generation | None] = [None] * len(flat)
        for i, g in zip(self.origin, flat, strict=True):
            out[i] = g
        return _regroup(original, [g for g in out if g is not None])


def fit_to_context(
    users: Sequence[UserQuestions],
    encode: Callable[[str], list[int]],
    limit: int | None,
    max_new_tokens: int,
    *,
    cot: bool = False,
) -> FittedPrompts:
    """Each prompt encoded by ``encode``; one that does not leave ``max_new_tokens`` in a context of
    ``limit`` tokens drops its user's earliest shots, one at a time, until it does (never the question:
    the latest shots are the most recent picks, as training drops them). Questions of one user that keep
    the same shots stay together, so they still share a prefix. LLMError if a question does not fit even
    with no shots left. ``limit`` None: no limit, nothing is cut."""
    groups: dict[tuple[int, int], list[tuple[int, str, list[int]]]] = {}
    flat = 0
    for u, user in enumerate(users):
        for question in user.questions:
            cut = 0
            while True:
                one = dataclasses.replace(user, shots=user.shots[cut:], questions=(question,))
                ids = encode(one.prompts(cot=cot)[0])
                if limit is None or len(ids) + max_new_tokens <= limit:
                    break
                if cut == len(user.shots):
                    raise LLMError(
                        f"a prompt of {len(ids)} tokens with every shot cut + {max_new_tokens} new tokens "
                        f"exceeds the model's context of {limit} tokens (question: {question[:60]!r})"
                    )
                cut += 1
            groups.setdefault((u, cut), []).append((flat, question, ids))
            flat += 1
    fitted = FittedPrompts([], [], [], [])
    for (u, cut), items in groups.items():
        user = users[u]
        questions = tuple(q for _, q, _ in items)
        fitted.users.append(dataclasses.replace(user, shots=user.shots[cut:], questions=questions))
        fitted.ids += [ids for _, _, ids in items]
        fitted.shots_cut += [cut] * len(items)
        fitted.origin += [i for i, _, _ in items]
    return fitted


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


def _shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading token ids all ``prompts`` share, leaving every prompt at least one of its own.

    The cut is on token ids, not text, so reusing the prefix's KV cache is exact by causality whatever
    the tokenizer does at the boundary: with a BPE tokenizer the prompts share every token up to
    ``## Question\\n`` (and any words all their questions start with); a SentencePiece one that merges
    across the newline shares a token or two fewer. Each row keeps at least one token, the position
    that predicts its first new token; the chat template's closing turn markers simply join each
    question's suffix."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for other in prompts[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _prefix_cache_problem(model: Any) -> str | None:
    """Why a prefix's KV cache cannot be copied under other suffixes for this model, or None.

    The reuse path expands plain full-attention KV layers into preallocated buffers. A sliding-window
    layer (Gemma 2/3, Mistral with ``sliding_window``) keeps only its last window of keys and masks by
    it, linear-attention or hybrid layers keep a state instead of keys: those models take the plain
    path, which is what ``generate`` does for them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    except (TypeError, ValueError, AttributeError) as exc:  # a config the cache classes do not know
        return f"its KV cache cannot be built from its config ({type(exc).__name__}), so a shared prefix is not reused"
    if kinds <= {DynamicLayer.__name__}:
        return None
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    what = f"sliding-window attention (window {window})" if window else "not plain full attention"
    return f"its KV cache layers ({', '.join(sorted(kinds))}) are {what}, so a shared prefix is not reused"


@functools.cache
def _log_once(message: str) -> None:
    logger.warning(message)


def _prefill_prefix(model: Any, prefix_ids: list[int]) -> list[tuple[Any, Any]]:
    """Run the shared prefix once (batch of 1); its per-layer (keys, values)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    input_ids = torch.tensor([prefix_ids], dtype=torch.long, device=model.device)
    # Only the cache is wanted; logits_to_keep=1 avoids a (prefix x vocab) logits tensor.
    model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    # An attention model's DynamicCache holds key/value layers; the stub's union also names the
    # linear-attention layers of hybrid models, which have no keys.
    return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr]


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
        logits, cache, attention_mask, next_pos = self._run_suffixes(
            prefix_kv, prefix_len, suffixes, max_new_tokens
        )
        return self._decode_loop(logits, cache, attention_mask, next_pos, samplings, max_new_tokens)

    def _run_suffixes(
        self,
        prefix_kv: list[tuple[Any, Any]],
        prefix_len: int,
        suffixes: list[list[int]],
        max_new_tokens: int,
    ) -> tuple[Any, Any, Any, Any]:
        """The suffix step: every row's suffix, right-padded, run on its copy of the prefix cache.

        Returns (each row's logits for its first new token, the cache, the attention mask, each row's
        position of its next token)."""
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
            cache=cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits
        logits = logits[torch.arange(b, device=device), where]  # (b, vocab)
        return logits, cache, attention_mask, prefix_len + lengths

    def _decode_loop(
        self,
        logits: Any,
        cache: Any,
        attention_mask: Any,
        next_pos: Any,
        samplings: list[_Sampling],
        max_new_tokens: int,
    ) -> list[tuple[list[int], str]]:
        """Pick a token for every live row, drop the rows that stopped, run one step; until every row
        stopped or has ``max_new_tokens`` tokens. Each row's new ids and finish reason."""
        import torch

        model, device = self.model, self.model.device
        b = len(samplings)
        generators = [row_generator(s.seed, device) for s in samplings]
        new_ids: list[list[int]] = [[] for _ in range(b)]
        finish = ["length"] * b
        active = list(range(b))  # batch row of each live row
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
                cache=cache,
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
