"""``OpenAICompatBackend``: chat and plain-text completions through any OpenAI-compatible server
(vLLM's, a hosted one, or ``fspo serve-model``) with concurrent, retried HTTP requests."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

import httpx

from .chat import (
    MAX_TOP_LOGPROBS,
    ChatRequest,
    ChoiceReply,
    Completion,
    LLMError,
    ProgressFn,
    TextRequest,
    _one_line,
    normalized_probs,
)


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

    def _request_body(self, key: str, value: Any, request: ChatRequest | TextRequest) -> dict[str, Any]:
        """The fields every request sends: the served model, ``key`` (the messages or the prompt), the
        sampling settings and the seed when there is one."""
        body: dict[str, Any] = {
            "model": self.model,
            key: value,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        return body

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body = self._request_body("messages", request.messages, request)
        if request.choices is not None:
            body["guided_choice"] = list(request.choices)
        if request.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = request.top_logprobs
        return body

    def _chat_one(self, request: ChatRequest) -> str:
        return self._with_retries(self._url, self._body(request), _chat_content, "choices[0].message.content")

    def _text_one(self, request: TextRequest) -> Completion:
        body = self._request_body("prompt", request.prompt, request)
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
