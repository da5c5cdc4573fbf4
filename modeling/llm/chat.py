"""The chat-LLM interface every back end shares: requests (``ChatRequest``, ``TextRequest``), replies
(``Completion``, ``ChoiceReply``), the ``ChatBackend`` / ``ChoiceBackend`` protocols and ``LLMError``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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
    """The decoding settings a request carries (``ChatRequest``, ``TextRequest``): read-only, so frozen
    dataclasses satisfy it."""

    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def seed(self) -> int | None: ...


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
