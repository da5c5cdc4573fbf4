"""``TransformersBackend``: a local Hugging Face causal-LM directory (optionally with LoRA adapters)
answering chat and plain-text requests with batched ``generate``; the engine behind ``fspo serve-model``."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .chat import (
    ChatRequest,
    ChoiceReply,
    Completion,
    LLMError,
    ProgressFn,
    TextRequest,
    TokenLogprob,
    _one_line,
    normalized_probs,
)
from .encoding import plain_prompt_ids
from .generation import (
    _cut_at_strings,
    context_length,
    generate_ids,
    left_pad,
    pad_token_id,
    stop_token_ids,
)

DTYPES = ("float32", "float16", "bfloat16", "auto")


class TransformersBackend:
    """Chat with a local Hugging Face causal-LM directory (optionally with LoRA adapters).

    The model loads once. Prompts go through the tokenizer's chat template (or the tiny model's
    ``### Role:`` template when the tokenizer has none) and are generated in left-padded batches
    of ``batch_size``: greedy when ``temperature == 0``, otherwise sampled per row with a
    ``torch.Generator`` seeded from ``request.seed`` when given. Requests with ``choices`` are not
    generated: each choice is scored by its summed log-prob as a continuation of the prompt and
    the best is returned, which is exact constrained choice (``choice_replies`` also returns every
    choice's probability). Rows of one batch keep their own sampling, ``max_tokens`` and stop strings,
    so a request's greedy reply is the same batched or alone.

    The backend is thread-safe: one lock serialises every use of the model.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        adapter_dir: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise LLMError(f"cannot load model: {model_dir} is not a directory")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = model_dir
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = f"hf:{model_dir}"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            # Typed as the torch module it is: transformers' stub of its decorated .to takes the model.
            model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype="auto" if dtype == "auto" else getattr(torch, dtype)
            )
        except Exception as exc:  # a damaged or foreign directory fails anywhere in transformers
            raise LLMError(
                f"cannot load model from {model_dir}: {type(exc).__name__}: {_one_line(str(exc))}"
            ) from None
        self.model: Any = model.to(self.device).eval()
        self._lock = threading.RLock()
        self._adapters: dict[str, Path] = {}
        self._default_adapter: str | None = None

        try:
            self._stop_ids = stop_token_ids(self.model, self.tokenizer)
        except LLMError as exc:
            raise LLMError(f"cannot use model at {model_dir}: {exc}") from None
        self._pad_id: int = pad_token_id(self.tokenizer, self._stop_ids)
        self.context_length: int | None = context_length(self.model)

        if adapter_dir is not None:
            self.load_adapter("default", adapter_dir)
            self._default_adapter = "default"
            self.name += f"+{adapter_dir}"

    # -- adapters --------------------------------------------------------------------------------

    @property
    def default_adapter(self) -> str | None:
        """The adapter ``chat`` uses (the one given as ``adapter_dir``), or None for the base model."""
        return self._default_adapter

    @property
    def adapters(self) -> dict[str, Path]:
        """Loaded LoRA adapters by name."""
        return dict(self._adapters)

    def load_adapter(self, name: str, adapter_dir: str | Path) -> None:
        """Load a peft adapter directory under ``name``; which adapter ``chat`` uses does not change."""
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise LLMError(f"cannot load adapter {name!r}: {adapter_dir} has no adapter_config.json")
        with self._lock:
            if name in self._adapters:
                raise LLMError(f"cannot load adapter {name!r}: an adapter with that name is already loaded")
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(adapter_dir, adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, adapter_dir, adapter_name=name)
            except (OSError, ValueError, RuntimeError) as exc:
                raise LLMError(
                    f"cannot load adapter {name!r} from {adapter_dir}: {_one_line(str(exc))}"
                ) from None
            self.model.to(self.device).eval()
            self._adapters[name] = adapter_dir

    @contextmanager
    def use_adapter(self, name: str | None) -> Iterator[None]:
        """Hold the model with adapter ``name`` active (``None``: the base model, adapters disabled)."""
        with self._lock:
            if name is not None and name not in self._adapters:
                loaded = ", ".join(sorted(self._adapters)) or "none"
                raise LLMError(f"unknown adapter {name!r} (loaded: {loaded})")
            if not self._adapters:
                yield
            elif name is None:
                with self.model.disable_adapter():
                    yield
            else:
                previous = self.model.active_adapter
                self.model.set_adapter(name, inference_mode=True)
                try:
                    yield
                finally:
                    self.model.set_adapter(previous, inference_mode=True)

    # -- public entry points ---------------------------------------------------------------------

    def chat(self, requests: Sequence[ChatRequest], *, progress: ProgressFn | None = None) -> list[str]:
        """Answer ``requests`` in input order (with ``adapter_dir``'s adapter if one was given)."""
        with self.use_adapter(self._default_adapter):
            return [c.text for c in self.complete(requests, progress=progress)]

    def choice_replies(
        self, requests: Sequence[ChatRequest], *, progress: ProgressFn | None = None
    ) -> list[ChoiceReply]:
        """Each request's choice (picked as ``chat`` picks it) and every choice's exact probability:
        the softmax of the choices' summed log-probs as continuations of the prompt, over the choices."""
        if any(r.choices is None for r in requests):
            raise ValueError("choice_replies needs requests with choices")
        with self.use_adapter(self._default_adapter), self._lock:
            prompts = [self.prompt_ids(r.messages) for r in requests]
            for ids in prompts:
                self._check_length(ids, 1)
            scores, _ = self._choice_scores(prompts, requests)
        if progress is not None:
            progress(len(requests), len(requests))
        replies = []
        for request, row in zip(requests, scores, strict=True):
            assert request.choices is not None
            probs = normalized_probs(dict(zip(request.choices, row, strict=True)))
            replies.append(ChoiceReply(request.choices[_pick_choice(row, request)], probs))
        return replies

    def complete(
        self,
        requests: Sequence[ChatRequest | TextRequest],
        *,
        progress: ProgressFn | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> list[Completion]:
        """Run ``requests`` with the model as currently set (see ``use_adapter``), in input order.

        Chat requests go through the chat template, ``TextRequest``s are used as plain text; both
        generate together in batches of up to ``batch_size`` rows, each row with its own sampling,
        ``max_tokens`` and stop strings. Requests with ``choices`` are scored together in one pass.
        ``on_text`` (single request only) receives the reply's text incrementally as it is
        generated; the pieces concatenate to the final ``Completion.text``.
        """
        if on_text is not None and len(requests) != 1:
            raise ValueError("on_text streaming needs exactly one request")
        results: list[Completion | None] = [None] * len(requests)
        total = len(requests)

        # Under the lock: the Rust tokenizer is not safe to share across threads either.
        with self._lock:
            prompts = [
                self.text_prompt_ids(r.prompt) if isinstance(r, TextRequest) else self.prompt_ids(r.messages)
                for r in requests
            ]
            for request, ids in zip(requests, prompts, strict=True):
                self._check_length(ids, 1 if _choices(request) else request.max_tokens)
            chosen = [i for i, r in enumerate(requests) if _choices(r)]
            if chosen:
                scored = [requests[i] for i in chosen]
                scores, positions = self._choice_scores(
                    [prompts[i] for i in chosen],
                    scored,  # type: ignore[arg-type]
                    with_logprobs=[r.logprobs for r in scored],  # type: ignore[union-attr]
                )
                for i, row, at in zip(chosen, scores, positions, strict=True):
                    request = requests[i]
                    assert isinstance(request, ChatRequest) and request.choices is not None
                    pick = _pick_choice(row, request)
                    text = request.choices[pick]
                    ids = self._encode(text)
                    logprobs = None
                    if at is not None:
                        firsts = [self._encode(c)[:1] for c in request.choices]
                        extra = sorted({f[0] for f in firsts if f})
                        logprobs = self._token_entries(at[pick], ids, request.top_logprobs, extra)
                    results[i] = Completion(text, len(prompts[i]), len(ids), "stop", logprobs)
                    if on_text is not None:
                        on_text(text)
                if progress is not None:
                    progress(len(chosen), total)

            todo = [i for i, r in enumerate(requests) if not _choices(r)]
            self._generate_all(prompts, requests, todo, results, len(chosen), progress, on_text)
        return [r for r in results if r is not None]

    def complete_text(
        self, requests: Sequence[TextRequest], *, progress: ProgressFn | None = None
    ) -> list[Completion]:
        """Complete plain-text prompts (no chat template; BOS once) with the model as currently set
        (see ``use_adapter``): the raw-prompt path behind ``/v1/completions``."""
        return self.complete(requests, progress=progress)

    def _generate_all(
        self,
        prompts: list[list[int]],
        requests: Sequence[ChatRequest | TextRequest],
        todo: list[int],
        results: list[Completion | None],
        done: int,
        progress: ProgressFn | None,
        on_text: Callable[[str], None] | None,
    ) -> None:
        # Each row has its own budget and stop strings (generate_ids' budgets / row_done), so any rows
        # can share a batch; shortest prompts together to limit padding.
        total = len(requests)
        todo = sorted(todo, key=lambda i: len(prompts[i]))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            outputs = self._generate([prompts[i] for i in batch], [requests[i] for i in batch], on_text)
            for i, completion in zip(batch, outputs, strict=True):
                results[i] = completion
            done += len(batch)
            if progress is not None:
                progress(done, total)

    # -- building blocks -------------------------------------------------------------------------

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template plus the assistant header."""
        from modeling.tinymodel import CHAT_TEMPLATE

        template = None if getattr(self.tokenizer, "chat_template", None) else CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
        # The template already writes any BOS it wants; adding special tokens again would double it.
        # tokenize=False returns the rendered str; the stub's return type unions every mode's result.
        return self._encode(text)  # type: ignore[arg-type]

    def text_prompt_ids(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt: the tokenizer's BOS (once), then the text as is."""
        return plain_prompt_ids(self.tokenizer, text)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_length(self, ids: list[int], new_tokens: int) -> None:
        if self.context_length is not None and len(ids) + new_tokens > self.context_length:
            raise LLMError(
                f"prompt of {len(ids)} tokens + {new_tokens} new tokens exceeds the context of "
                f"{self.model_dir.name} ({self.context_length} tokens)"
            )

    def score_continuations(self, prompt: list[int], continuations: Sequence[str]) -> list[float]:
        """Summed log-prob of each continuation's tokens given ``prompt`` (one float each)."""
        with self._lock:
            return self._score_rows([(prompt, self._encode(c)) for c in continuations])[0]

    def _choice_scores(
        self,
        prompts: list[list[int]],
        requests: Sequence[ChatRequest],
        with_logprobs: Sequence[bool] | None = None,
    ) -> tuple[list[list[float]], list[list[Any] | None]]:
        """Summed log-prob of every choice of every request, all scored in the same batches; and, for
        the requests ``with_logprobs`` marks, each choice's (tokens x vocabulary) log-probs.

        When every choice is one token ("A" / "B"), one pass over the prompt gives them all (the last
        position's log-probs); otherwise each choice is a row of its own (prompt + choice)."""
        import torch

        encoded = [[self._encode(c) for c in r.choices or ()] for r in requests]
        scores: list[list[float]] = [[] for _ in requests]
        positions: list[list[Any] | None] = [None] * len(requests)
        single = [r for r, ids in enumerate(encoded) if all(len(c) == 1 for c in ids)]
        single.sort(key=lambda r: len(prompts[r]))
        with self._lock, torch.inference_mode():
            for start in range(0, len(single), self.batch_size):
                chunk = single[start : start + self.batch_size]
                logprobs = self._last_logprobs([prompts[r] for r in chunk], 1)
                for row, r in enumerate(chunk):
                    scores[r] = [float(logprobs[row, 0, c[0]]) for c in encoded[r]]
                    if with_logprobs is not None and with_logprobs[r]:
                        positions[r] = [logprobs[row, 0:1].clone()] * len(encoded[r])
        rows: list[tuple[list[int], list[int]]] = []
        spans: list[tuple[int, int]] = []
        keep: set[int] = set()
        multi = [r for r in range(len(requests)) if r not in set(single)]
        for r in multi:
            spans.append((len(rows), len(encoded[r])))
            if with_logprobs is not None and with_logprobs[r]:
                keep.update(range(len(rows), len(rows) + len(encoded[r])))
            rows += [(prompts[r], ids) for ids in encoded[r]]
        flat, kept = self._score_rows(rows, keep)
        for r, (start, n) in zip(multi, spans, strict=True):
            scores[r] = flat[start : start + n]
            if start in kept:
                positions[r] = [kept[k] for k in range(start, start + n)]
        return scores, positions

    def _score_rows(
        self,
        rows: list[tuple[list[int], list[int]]],
        keep: set[int] = frozenset(),  # type: ignore[assignment]
    ) -> tuple[list[float], dict[int, Any]]:
        """Summed log-prob of each (prompt, continuation ids) row's continuation, in batches of
        ``batch_size`` rows of similar length; and, for the rows in ``keep``, the (continuation tokens x
        vocabulary) log-probs that predict them."""
        import torch

        order = sorted(range(len(rows)), key=lambda k: len(rows[k][0]) + len(rows[k][1]))
        scores = [0.0] * len(rows)
        kept: dict[int, Any] = {}
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                conts = [rows[k][1] for k in chunk]
                width = max(len(c) for c in conts) + 1
                logprobs = self._last_logprobs([rows[k][0] + rows[k][1] for k in chunk], width)
                for row, (k, cont) in enumerate(zip(chunk, conts, strict=True)):
                    # Token cont[j] sits at position -(len(cont) - j) of the row; the logit that
                    # predicts it is one position earlier.
                    n = len(cont)
                    positions = torch.arange(width - 1 - n, width - 1, device=logprobs.device)
                    targets = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
                    scores[k] = float(logprobs[row, positions, targets].sum())
                    if k in keep:
                        kept[k] = logprobs[row, positions].clone()
        return scores, kept

    def _last_logprobs(self, seqs: list[list[int]], keep: int) -> Any:
        """Log-softmax over the vocabulary at the last ``keep`` positions of each left-padded row."""
        import torch

        input_ids, attention_mask = self._left_pad(seqs)
        # Left padding aligns every sequence's end, so the last ``keep`` positions hold every logit
        # we need; keeping only those avoids a (batch x prompt x vocab) logits tensor on long prompts.
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_position_ids(attention_mask),
            logits_to_keep=keep,
        ).logits.float()
        return torch.log_softmax(logits, dim=-1)

    def _token_logprobs(self, prompt: list[int], ids: list[int], top: int) -> tuple[TokenLogprob, ...]:
        """The model's log-prob of each of ``ids`` after ``prompt`` (before temperature or top-p, as
        vLLM reports them) with the ``top`` most likely tokens at each position."""
        import torch

        if not ids:
            return ()
        with torch.inference_mode():
            logprobs = self._last_logprobs([prompt + ids], len(ids) + 1)[0, :-1]
        return self._token_entries(logprobs, ids, top)

    def _token_entries(
        self, logprobs: Any, ids: list[int], top: int, extra_first: Sequence[int] = ()
    ) -> tuple[TokenLogprob, ...]:
        """``TokenLogprob``s of ``ids`` from the (len(ids) x vocabulary) log-probs that predict them;
        ``extra_first`` are listed at the first position too (a choice's first token, so a client can
        read every choice)."""
        import torch

        out = []
        for j, token in enumerate(ids):
            row = logprobs[j]
            alternatives: dict[int, float] = {}
            if top:
                values, indices = torch.topk(row, top)
                alternatives = dict(zip(indices.tolist(), values.tolist(), strict=True))
            if j == 0:
                for t in extra_first:
                    alternatives.setdefault(t, float(row[t]))
            ranked = sorted(alternatives.items(), key=lambda item: -item[1])
            out.append(
                TokenLogprob(
                    self._token_text(token),
                    float(row[token]),
                    tuple((self._token_text(t), logprob) for t, logprob in ranked),
                )
            )
        return tuple(out)

    def _token_text(self, token: int) -> str:
        # One sequence decodes to a str (the stub's list[str] is a batch's result).
        return self.tokenizer.decode(  # type: ignore[return-value]
            [token], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _left_pad(self, seqs: list[list[int]]) -> tuple[Any, Any]:
        return left_pad(seqs, self._pad_id, self.device)

    def _generate(
        self,
        prompts: list[list[int]],
        requests: Sequence[ChatRequest | TextRequest],
        on_text: Callable[[str], None] | None,
    ) -> list[Completion]:
        streamer = _TextDeltaStreamer(self, on_text) if on_text is not None else None
        stops = [getattr(r, "stop", ()) for r in requests]

        def wrote_stop(row: int, ids: list[int]) -> bool:
            return any(x in self._decode(ids) for x in stops[row])

        budgets = [r.max_tokens for r in requests]
        outputs = generate_ids(
            self.model,
            prompts,
            requests,
            max(budgets),
            stop_ids=self._stop_ids,
            pad_id=self._pad_id,
            streamer=streamer,
            budgets=budgets,
            row_done=wrote_stop if any(stops) else None,
        )
        completions = []
        for prompt, request, row_stops, (ids, finish) in zip(prompts, requests, stops, outputs, strict=True):
            n_tokens = len(ids) + (finish == "stop")
            text = self._decode(ids)
            if row_stops and any(x in text for x in row_stops):
                # The count is of tokens up to the one that completes the stop string.
                text = _cut_at_strings(text, row_stops)
                n_tokens = next(k for k in range(1, len(ids) + 1) if len(self._decode(ids[:k])) > len(text))
                finish = "stop"
            logprobs = None
            if isinstance(request, ChatRequest) and request.logprobs:
                returned = ids[: min(n_tokens, len(ids))]
                logprobs = self._token_logprobs(prompt, returned, request.top_logprobs)
            completions.append(Completion(text, len(prompt), n_tokens, finish, logprobs))
        return completions

    def _decode(self, ids: list[int]) -> str:
        # One sequence decodes to a str (the stub's list[str] is a batch's result).
        return self.tokenizer.decode(  # type: ignore[return-value]
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


def _choices(request: ChatRequest | TextRequest) -> bool:
    return isinstance(request, ChatRequest) and request.choices is not None


def _pick_choice(scores: Sequence[float], request: ChatRequest) -> int:
    """Greedy (temperature 0): the most likely choice. Otherwise sample a choice from the softmax of
    its summed log-probs / temperature, seeded by the request's seed (as vLLM's guided_choice samples)."""
    if request.temperature == 0:
        return max(range(len(scores)), key=scores.__getitem__)
    logits = [s / request.temperature for s in scores]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    rnd = random.Random(request.seed) if request.seed is not None else random.Random()
    return rnd.choices(range(len(scores)), weights=weights)[0]


def _position_ids(attention_mask: Any) -> Any:
    # Left padding shifts real tokens right; positions must still count from 0 at the first real
    # token (pads get 0, they are masked anyway), as generate() does.
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class _TextDeltaStreamer:
    """A transformers streamer (batch of one) that reports newly decoded text as it appears.

    It decodes the whole reply so far and emits the new suffix, holding back text that ends in an
    incomplete UTF-8 sequence, so the pieces always concatenate to the final decoded reply.
    """

    def __init__(self, backend: TransformersBackend, on_text: Callable[[str], None]) -> None:
        self.backend = backend
        self.on_text = on_text
        self.ids: list[int] = []
        self.emitted = ""
        self.seen_prompt = False
        self.stopped = False

    def put(self, value: Any) -> None:
        if not self.seen_prompt:  # generate() first sends the prompt ids
            self.seen_prompt = True
            return
        for token in value.reshape(-1).tolist():
            if self.stopped or token in self.backend._stop_ids:
                self.stopped = True
                break
            self.ids.append(token)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, *, final: bool) -> None:
        text = self.backend._decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted) :])
            self.emitted = text
