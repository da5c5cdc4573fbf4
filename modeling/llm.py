"""One interface for chat LLMs used by the data engine (persona writing, labeling, judging, ...).

Two back ends share the ``ChatBackend`` protocol:

- ``OpenAICompatBackend`` talks to any OpenAI-compatible server (vLLM's, a hosted one, or our own
  ``fspo serve-model``) with concurrent, retried HTTP requests;
- ``TransformersBackend`` runs a local Hugging Face causal-LM directory (optionally with LoRA
  adapters) with batched ``generate``; it is also the engine behind ``fspo serve-model``.

Both also complete plain-text prompts (``TextRequest``, OpenAI's ``/completions``: no chat template),
which is how FSPO's Markdown prompts are served (see ``modeling.infer``).

``backend_from_spec`` turns a one-string spec (as used in configs and on the CLI) into a back end.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

ProgressFn = Callable[[int, int], None]

_ROLES = ("system", "user", "assistant")


class LLMError(RuntimeError):
    """An LLM call failed; the message is one line naming the endpoint or model and the cause."""


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to run.

    ``messages`` are OpenAI-format ``{"role", "content"}`` dicts. ``temperature == 0`` means greedy.
    ``choices`` constrains the reply to exactly one of the given strings. ``logprobs`` asks for each
    reply token's log-prob and ``top_logprobs`` for that many of the most likely tokens at each position
    (OpenAI's fields; ``Completion.logprobs``).
    """

    messages: list[dict[str, str]]
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    choices: tuple[str, ...] | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.messages, list) or not self.messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
        for i, message in enumerate(self.messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
            if message.get("role") not in _ROLES:
                raise ValueError(
                    f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {message.get('role')!r}"
                )
            if not isinstance(message.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        _check_sampling(self.max_tokens, self.temperature, self.top_p, self.seed)
        if self.choices is not None:
            if (
                isinstance(self.choices, str)
                or not isinstance(self.choices, list | tuple)
                or not self.choices
            ):
                raise ValueError("choices must be a non-empty list of non-empty strings")
            if not all(isinstance(c, str) and c for c in self.choices):
                raise ValueError("choices must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choices", tuple(self.choices))
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be a boolean, got {self.logprobs!r}")
        top = self.top_logprobs
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}")
        if top and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")


@dataclass(frozen=True)
class TextRequest:
    """One plain-text completion (OpenAI's ``/completions``): ``prompt`` is used as is, with no chat
    template; whoever tokenizes it prepends the tokenizer's BOS once (``plain_prompt_ids``).

    ``temperature == 0`` means greedy. The reply ends before the first of the ``stop`` strings.
    """

    prompt: str
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError("prompt must be a string")
        _check_sampling(self.max_tokens, self.temperature, self.top_p, self.seed)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, list | tuple) or not all(isinstance(x, str) and x for x in stop):
            raise ValueError("stop must be a string or a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))


class Sampling(Protocol):
    """The decoding settings a request carries (``ChatRequest``, ``TextRequest``)."""

    temperature: float
    top_p: float
    seed: int | None


def _check_sampling(max_tokens: object, temperature: object, top_p: object, seed: object) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not _is_number(temperature) or not 0 <= temperature <= 100:  # type: ignore[operator]
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:  # type: ignore[operator]
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or null, got {seed!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@runtime_checkable
class ChatBackend(Protocol):
    """Anything that answers a batch of chat requests, in input order.

    Back ends that can also tell how likely each of a request's ``choices`` is implement
    ``ChoiceBackend``; ``ask_choices`` is the one way to ask any back end for choices."""

    name: str

    def chat(self, requests: Sequence[ChatRequest], *, progress: ProgressFn | None = None) -> list[str]: ...


@dataclass(frozen=True)
class ChoiceReply:
    """The answer to a request with ``choices``: the reply, and each choice's probability.

    ``probs`` maps every choice to its probability renormalised over the choices (they sum to 1), or is
    None when the back end gave no probabilities (a server without logprobs): then only ``text`` says
    what the model answered."""

    text: str
    probs: dict[str, float] | None = None


@runtime_checkable
class ChoiceBackend(ChatBackend, Protocol):
    """A ``ChatBackend`` that also reads the probabilities of each request's ``choices``."""

    def choice_replies(
        self, requests: Sequence[ChatRequest], *, progress: ProgressFn | None = None
    ) -> list[ChoiceReply]: ...


def ask_choices(
    backend: ChatBackend, requests: Sequence[ChatRequest], *, progress: ProgressFn | None = None
) -> list[ChoiceReply]:
    """Ask ``requests`` (each with ``choices``, e.g. ``("A", "B")``) and read the choices' probabilities
    where ``backend`` gives them (``ChoiceBackend``); any other back end answers with its reply only
    (``ChoiceReply.probs`` None), which a caller reads as a sampled choice."""
    if any(r.choices is None for r in requests):
        raise ValueError("ask_choices needs requests with choices")
    if isinstance(backend, ChoiceBackend):
        return backend.choice_replies(requests, progress=progress)
    return [ChoiceReply(text) for text in backend.chat(requests, progress=progress)]


def normalized_probs(logprobs: dict[str, float]) -> dict[str, float]:
    """Probabilities from (unnormalised) log-probs, renormalised to sum to 1."""
    top = max(logprobs.values())
    weights = {k: math.exp(v - top) for k, v in logprobs.items()}
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP back end


class _Retryable(Exception):
    """A failure worth retrying; ``message`` is the final LLMError text if retries run out."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class OpenAICompatBackend:
    """Chat through an OpenAI-compatible ``/chat/completions`` endpoint.

    ``complete_text`` does the same for plain-text prompts through ``/completions`` (vLLM selects a
    LoRA adapter by its served name in ``model``).

    Requests run concurrently (``max_concurrency`` threads) and come back in input order.
    Connection errors, timeouts, HTTP 429 / 5xx and malformed 200 replies are retried
    ``max_retries`` times with exponential backoff (``backoff_s * 2**attempt``); other 4xx fail at
    once. ``ChatRequest.choices`` is sent as vLLM's ``guided_choice``; a reply outside the choices
    (a server that ignores the field) is returned as is.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_concurrency: int = 8,
        max_retries: int = 3,
        timeout_s: float = 600.0,  # the OpenAI client's default: a CPU server's batch can take minutes
        backoff_s: float = 0.5,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("model must be a non-empty name")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("need max_concurrency >= 1, max_retries >= 0, timeout_s > 0, backoff_s >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"{self.base_url}#{model}"
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._url = f"{self.base_url}/chat/completions"
        self._text_url = f"{self.base_url}/completions"
        self._client = httpx.Client(
            timeout=timeout_s,
            headers=headers,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> OpenAICompatBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chat(self, requests: Sequence[ChatRequest], *, progress: ProgressFn | None = None) -> list[str]:
        """Run ``requests`` concurrently; return the replies in input order or raise ``LLMError``."""
        return self._map(self._chat_one, requests, progress)

    def complete_text(
        self, requests: Sequence[TextRequest], *, progress: ProgressFn | None = None
    ) -> list[Completion]:
        """Run plain-text ``requests`` through ``/completions`` concurrently, in input order."""
        return self._map(self._text_one, requests, progress)

    def choice_replies(
        self, requests: Sequence[ChatRequest], *, progress: ProgressFn | None = None
    ) -> list[ChoiceReply]:
        """Ask ``requests`` (with ``choices``) concurrently with ``logprobs`` and read each choice's
        probability from the first reply token's ``top_logprobs`` (OpenAI's and vLLM's shape).

        This reads single-token answers ("A", "B"): a choice matches a listed token equal to it once
        surrounding spaces are stripped (the probabilities of such variants add up). A choice the server
        did not list is at most as likely as the least likely token it did list, and is given that
        bound. A reply without log-probs (a server that ignores the field) gives ``probs`` None."""
        if any(r.choices is None for r in requests):
            raise ValueError("choice_replies needs requests with choices")
        return self._map(self._choice_one, requests, progress)

    def _choice_one(self, request: ChatRequest) -> ChoiceReply:
        body = {**self._body(request), "logprobs": True, "top_logprobs": MAX_TOP_LOGPROBS}
        assert request.choices is not None
        choices = request.choices
        return self._with_retries(
            self._url, body, lambda reply: _choice_reply(reply, choices), "choices[0].message.content"
        )

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any], progress: ProgressFn | None) -> list[Any]:
        total = len(items)
        results: list[Any] = [None] * total
        if total == 0:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, total), thread_name_prefix="llm-http")
        try:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            pending = set(futures)
            done_count = 0
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    results[futures[future]] = future.result()  # re-raises the first LLMError
                    done_count += 1
                    if progress is not None:
                        progress(done_count, total)
        finally:
            # On failure, drop queued requests instead of sending them; running ones finish alone.
            pool.shutdown(wait=False, cancel_futures=True)
        return results

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.choices is not None:
            body["guided_choice"] = list(request.choices)
        if request.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = request.top_logprobs
        return body

    def _chat_one(self, request: ChatRequest) -> str:
        return self._with_retries(self._url, self._body(request), _chat_content, "choices[0].message.content")

    def _text_one(self, request: TextRequest) -> Completion:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        return self._with_retries(self._text_url, body, _text_completion, "choices[0].text")

    def _with_retries(
        self, url: str, body: dict[str, Any], extract: Callable[[Any], Any], expected: str
    ) -> Any:
        attempts = 1 + self.max_retries
        for attempt in range(attempts):
            try:
                return self._post(url, body, extract, expected)
            except _Retryable as failure:
                if attempt == attempts - 1:
                    suffix = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
                    raise LLMError(failure.message + suffix) from None
                delay = self.backoff_s * 2**attempt
                if failure.retry_after is not None:
                    delay = max(delay, min(failure.retry_after, 60.0))
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, url: str, body: dict[str, Any], extract: Callable[[Any], Any], expected: str) -> Any:
        """POST ``body``; ``extract`` maps the JSON reply to the result, or None when it is malformed."""
        try:
            response = self._client.post(url, json=body)
        except httpx.ConnectError as exc:
            cause = (
                "connection refused"
                if "refused" in str(exc).lower()
                else _one_line(str(exc) or type(exc).__name__)
            )
            raise _Retryable(f"cannot reach LLM endpoint {self.base_url}: {cause}") from None
        except httpx.ConnectTimeout:
            raise _Retryable(
                f"cannot reach LLM endpoint {self.base_url}: connect timed out after {self.timeout_s:g}s"
            ) from None
        except httpx.TimeoutException:
            raise _Retryable(f"LLM endpoint {url} timed out after {self.timeout_s:g}s") from None
        except httpx.TransportError as exc:
            cause = _one_line(str(exc) or type(exc).__name__)
            raise _Retryable(f"cannot reach LLM endpoint {self.base_url}: {cause}") from None

        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(
                f"LLM endpoint {url} failed with HTTP {status}: {_error_detail(response)}",
                retry_after=_retry_after(response),
            )
        if status >= 400:
            raise LLMError(
                f"LLM endpoint {url} rejected the request (HTTP {status}): {_error_detail(response)}"
            )
        try:
            result = extract(response.json())
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            result = None
        if result is None:
            raise _Retryable(
                f"LLM endpoint {url} returned a malformed response: "
                f"expected JSON with {expected}, got {_one_line(response.text, 120)!r}"
            )
        return result


def _chat_content(reply: Any) -> str | None:
    content = reply["choices"][0]["message"]["content"]
    return content if isinstance(content, str) else None


def _choice_reply(reply: Any, choices: Sequence[str]) -> ChoiceReply | None:
    text = _chat_content(reply)
    if text is None:
        return None
    logprobs = reply["choices"][0].get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not content:
        return ChoiceReply(text)
    listed = [(t["token"], float(t["logprob"])) for t in content[0].get("top_logprobs") or []]
    listed = [(t, lp) for t, lp in listed if isinstance(t, str) and math.isfinite(lp)]
    found: dict[str, list[float]] = {}
    for token, logprob in listed:
        if token.strip() in choices:
            found.setdefault(token.strip(), []).append(logprob)
    if not found:
        return ChoiceReply(text)
    floor = min(lp for _, lp in listed)
    return ChoiceReply(
        text, normalized_probs({c: _logsumexp(found[c]) if c in found else floor for c in choices})
    )


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _text_completion(reply: Any) -> Completion | None:
    choice = reply["choices"][0]
    text = choice["text"]
    if not isinstance(text, str):
        return None
    usage = reply.get("usage") or {}  # optional in the protocol; vLLM and serve-model send it
    finish = choice.get("finish_reason")
    return Completion(
        text=text,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        finish_reason=finish if isinstance(finish, str) else "stop",
    )


def _error_detail(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return _one_line(str(message))
    except (ValueError, AttributeError):
        pass
    return _one_line(response.text) or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Local transformers back end


@dataclass(frozen=True)
class TokenLogprob:
    """One reply token's log-prob and the most likely tokens at its position (OpenAI's ``logprobs``)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    """A finished local completion with OpenAI-style accounting."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a constrained choice) or "length"
    logprobs: tuple[TokenLogprob, ...] | None = None  # when the request asked for them


_DTYPES = ("float32", "float16", "bfloat16", "auto")


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
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = model_dir
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = f"hf:{model_dir}"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(
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
        return self._encode(text)

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
        rows, spans, keep = [], [], set()
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
        return self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)

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
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _choices(request: ChatRequest | TextRequest) -> bool:
    return isinstance(request, ChatRequest) and request.choices is not None


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


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The EOS ids of the model's generation config and of its tokenizer (raises LLMError if none)."""
    stop = model.generation_config.eos_token_id
    ids = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise LLMError("neither its tokenizer nor its generation config has an EOS token")
    return ids


def pad_token_id(tokenizer: Any, stop_ids: set[int]) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else min(stop_ids)


def context_length(model: Any) -> int | None:
    limit = getattr(model.config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) else None


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of ``seqs`` left-padded to one width, on ``device``."""
    import torch

    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def generate_ids(
    model: Any,
    prompts: Sequence[Sequence[int]],
    samplings: Sequence[Sampling],
    max_new_tokens: int,
    *,
    stop_ids: set[int],
    pad_id: int,
    streamer: Any = None,
    budgets: Sequence[int] | None = None,
    row_done: Callable[[int, list[int]], bool] | None = None,
) -> list[tuple[list[int], str]]:
    """One left-padded batch through ``model.generate``: each row's new token ids, cut before the first
    stop token, and its finish reason ("stop" or "length").

    Rows are greedy when their ``temperature`` is 0, otherwise sampled by ``_RowSampler`` (own
    temperature, top-p and seeded RNG per row). ``budgets`` gives each row its own number of new tokens
    (at most ``max_new_tokens``); ``row_done(row, new_ids)`` may end a row early (it wrote a stop
    string). A finished row leaves the batch (generate pads it), and generation ends when all have."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    budgets = list(budgets) if budgets is not None else [max_new_tokens] * len(prompts)
    if len(budgets) != len(prompts) or not all(1 <= b <= max_new_tokens for b in budgets):
        raise ValueError("budgets must give every row a number of new tokens from 1 to max_new_tokens")
    input_ids, attention_mask = left_pad(prompts, pad_id, model.device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,  # sampling, when asked, happens in _RowSampler so each row has its own RNG
        eos_token_id=sorted(stop_ids),
        pad_token_id=pad_id,
    )
    processors = LogitsProcessorList()
    if any(s.temperature > 0 for s in samplings):
        processors.append(_RowSampler(samplings, model.device))
    criteria = StoppingCriteriaList()
    if row_done is not None or min(budgets) < max_new_tokens:
        criteria.append(_RowStop(input_ids.shape[1], budgets, stop_ids, row_done))
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=criteria,
            streamer=streamer,
        )
    results = []
    for row in range(len(prompts)):
        # A row that ran out of budget was padded after it: cut at the budget before looking for a stop.
        new_ids = output[row, input_ids.shape[1] : input_ids.shape[1] + budgets[row]].tolist()
        results.append(_cut_at_stop(new_ids, stop_ids))
    return results


class _RowStop:
    """Stopping criterion that finishes each row on its own: at its budget, or when ``row_done`` says
    so (a stop string was written). A finished row is padded by generate from then on."""

    def __init__(
        self,
        width: int,
        budgets: Sequence[int],
        stop_ids: set[int],
        row_done: Callable[[int, list[int]], bool] | None,
    ) -> None:
        self.width = width
        self.budgets = budgets
        self.stop_ids = stop_ids
        self.row_done = row_done
        self.done = [False] * len(budgets)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        n = input_ids.shape[1] - self.width
        for row, budget in enumerate(self.budgets):
            if self.done[row]:
                continue
            if n >= budget:
                self.done[row] = True
            elif self.row_done is not None:
                ids, finish = _cut_at_stop(input_ids[row, self.width :].tolist(), self.stop_ids)
                self.done[row] = finish == "stop" or self.row_done(row, ids)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(ids: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    for j, token in enumerate(ids):
        if token in stop_ids:
            return ids[:j], "stop"
    return ids, "length"


def _cut_at_strings(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(x) for x in stops) if i >= 0), default=len(text))
    return text[:cut]


def row_generator(seed: int | None, device: Any) -> Any:
    """A ``torch.Generator`` seeded with ``seed`` (None: use the global torch RNG)."""
    import torch

    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample_token(scores: Any, temperature: float, top_p: float, generator: Any) -> Any:
    """Sample one token id (a 1-element tensor) from a row of logits at ``temperature`` (> 0) with
    nucleus ``top_p``."""
    import torch

    probs = torch.softmax(scores.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token):
        # a token is dropped when the mass before it already reaches top_p.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)


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


class _RowSampler:
    """Logits processor that samples each row with its own temperature, top-p and RNG.

    It returns scores that are -inf everywhere except the sampled token, so generate's greedy
    step picks exactly that token; rows with temperature 0 pass through untouched (greedy).
    """

    def __init__(self, requests: Sequence[Sampling], device: Any) -> None:
        self.requests = requests
        self.generators = [row_generator(r.seed, device) for r in requests]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        out = scores.clone()
        for row, request in enumerate(self.requests):
            if request.temperature <= 0:
                continue
            token = sample_token(scores[row], request.temperature, request.top_p, self.generators[row])
            out[row] = float("-inf")
            out[row, token] = 0.0
        return out


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


# ---------------------------------------------------------------------------------------------


def backend_from_spec(spec: str, *, max_concurrency: int | None = None) -> ChatBackend:
    """Build a back end from a one-string spec.

    - ``http(s)://host:port/v1#model-name`` -> ``OpenAICompatBackend`` (API key from
      ``OPENAI_API_KEY`` if set; ``max_concurrency`` requests in flight, default 8);
    - ``hf:/path/to/dir`` or an existing directory -> ``TransformersBackend``; a peft adapter
      directory loads on top of the base model its ``adapter_config.json`` names.
    """
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        if not model:
            raise LLMError(
                f"LLM spec {spec!r} needs the model name after '#', e.g. http://127.0.0.1:8000/v1#my-model"
            )
        return OpenAICompatBackend(
            url, model, api_key=os.environ.get("OPENAI_API_KEY"), max_concurrency=max_concurrency or 8
        )
    path = Path(spec[3:] if spec.startswith("hf:") else spec).expanduser()
    if spec.startswith("hf:") or path.is_dir():
        if not path.is_dir():
            raise LLMError(f"LLM spec {spec!r}: {path} is not a directory")
        base, adapter = model_and_adapter_dirs(path, spec)
        return TransformersBackend(base, adapter_dir=adapter)
    raise LLMError(
        f"unknown LLM spec {spec!r}: expected 'http(s)://host:port/v1#model' or 'hf:/path/to/model-dir'"
    )


def model_and_adapter_dirs(path: Path, spec: str) -> tuple[Path, Path | None]:
    """(base model dir, adapter dir or None) of a local directory: a peft adapter directory loads on top
    of the base model its ``adapter_config.json`` names."""
    if not (path / "adapter_config.json").is_file():
        return path, None
    import json

    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        raise LLMError(f"LLM spec {spec!r}: {path}/adapter_config.json is not a JSON object") from None
    if not base or not Path(base).is_dir():
        raise LLMError(f"LLM spec {spec!r}: adapter's base model {base!r} is not a local directory")
    return Path(base), path
