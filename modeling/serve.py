"""``fspo serve-model``: an OpenAI-compatible HTTP server for a local model and its LoRA adapters.

It lets the data engine, the judges and the study workers talk to our own checkpoints exactly as
they talk to vLLM or a hosted endpoint. Generation and choice scoring are ``TransformersBackend``'s;
this module translates HTTP and batches: one worker thread owns the model, and the requests waiting
for it at the same moment (for the same served model or adapter) run as one batch, as vLLM batches
the requests it holds. Each row keeps its own sampling settings, seed, ``max_tokens`` and stop
strings, so a greedy reply is the same batched or alone. A request that finds the worker idle waits
``batch_window_s`` (a few milliseconds) for companions. Streaming requests run alone.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (``stream``, ``seed``,
``guided_choice``, ``logprobs`` / ``top_logprobs`` in OpenAI's response shape; ``model`` picks the base
model or an adapter by name), ``POST /v1/completions`` (plain-text prompts, no chat template, as FSPO's
Markdown prompts need; a string or a list of strings, ``max_tokens``, ``temperature``, ``top_p``,
``seed``, ``stop``), ``GET /health``, ``GET /metrics`` (batches run and their rows, as JSON).

Log-probs are the model's own (before temperature and top-p), as vLLM reports them by default. For a
``guided_choice`` request the first position's ``top_logprobs`` also lists each choice's first token,
so a client can read every choice's probability (``OpenAICompatBackend.choice_replies``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from modeling.llm import (
    DTYPES,
    ChatRequest,
    Completion,
    LLMError,
    TextRequest,
    TokenLogprob,
    TransformersBackend,
)
from modeling.models import ModelError, check_adapter_base, check_causal_lm_dir

DEFAULT_MAX_BATCH = 16
DEFAULT_BATCH_WINDOW_S = 0.02


def _unknown_model(model: str, targets: dict[str, Any]) -> JSONResponse:
    return _error(
        404,
        f"The model `{model}` does not exist (served: {', '.join(targets)}).",
        code="model_not_found",
        param="model",
    )


def _error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": param, "code": code}},
    )


def _content_text(content: Any) -> Any:
    """OpenAI allows content as a list of parts; keep the text parts, joined."""
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        texts = [t for t in parts if isinstance(t, str)]
        if len(texts) == len(content):
            return "".join(texts)
    return content


def _body_model(body: Any) -> str:
    """The ``model`` of a request body, which must be a JSON object (ValueError otherwise)."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("'model' is required and must be a string")
    return model


def _parse_body(body: Any) -> tuple[str, ChatRequest, bool, bool]:
    """Validate a chat-completions body; returns (model, request, stream, include_usage).

    Raises ValueError with a one-line message naming the bad field.
    """
    model = _body_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ValueError("'messages' is required and must be a list of {'role', 'content'} objects")
    messages = [
        {**m, "content": _content_text(m.get("content"))} if isinstance(m, dict) else m for m in messages
    ]
    n = body.get("n", 1)
    if n not in (1, None):
        raise ValueError(f"'n' must be 1 (got {n!r}): this server returns one choice per request")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ValueError("'stream' must be a boolean")
    stream_options = body.get("stream_options") or {}
    include_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if stream and body.get("logprobs"):
        raise ValueError("'logprobs' is not supported with 'stream' by this server")
    fields: dict[str, Any] = {"messages": messages}
    for key, value in (
        ("max_tokens", max_tokens),
        ("temperature", body.get("temperature")),
        ("top_p", body.get("top_p")),
        ("seed", body.get("seed")),
        ("choices", body.get("guided_choice")),
        ("logprobs", body.get("logprobs")),
        ("top_logprobs", body.get("top_logprobs")),
    ):
        if value is not None:
            fields[key] = value
    if "choices" in fields and not isinstance(fields["choices"], list):
        raise ValueError("'guided_choice' must be a list of non-empty strings")
    try:
        request = ChatRequest(**fields)
    except ValueError as exc:
        # ChatRequest names its own fields; speak the wire protocol's names instead.
        raise ValueError(str(exc).replace("choices", "guided_choice")) from None
    return model, request, stream, include_usage


def _parse_text_body(body: Any) -> tuple[str, list[TextRequest]]:
    """Validate a (text) completions body; returns (model, one request per prompt).

    Raises ValueError with a one-line message naming the bad field."""
    model = _body_model(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("'prompt' is required and must be a string or a non-empty list of strings")
    n = body.get("n", 1)
    if n not in (1, None):
        raise ValueError(f"'n' must be 1 (got {n!r}): this server returns one choice per prompt")
    for key in ("stream", "echo", "logprobs", "suffix"):
        if body.get(key):
            raise ValueError(f"'{key}' is not supported by this server's /v1/completions")
    if body.get("best_of") not in (1, None):
        raise ValueError("'best_of' must be 1")
    fields: dict[str, Any] = {"max_tokens": 16}  # OpenAI's default for /completions
    for key in ("max_tokens", "temperature", "top_p", "seed", "stop"):
        if body.get(key) is not None:
            fields[key] = body[key]
    return model, [TextRequest(prompt=p, **fields) for p in prompts]


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs_json(logprobs: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    """OpenAI's chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    if logprobs is None:
        return None
    return {
        "content": [
            {
                **_token_entry(t.token, t.logprob),
                "top_logprobs": [_token_entry(token, logprob) for token, logprob in t.top],
            }
            for t in logprobs
        ]
    }


@dataclass
class _Job:
    target: str | None  # the adapter to use (None: the base model)
    request: ChatRequest | TextRequest
    arrived: float
    settle: Callable[[Completion | BaseException], None]
    on_text: Callable[[str], None] | None = None  # a streaming job runs alone


@dataclass
class BatchStats:
    """What the worker has run: ``batches`` (each one ``backend.complete`` call) holding ``rows``
    requests; ``sizes`` counts batches by their number of rows."""

    batches: int = 0
    rows: int = 0
    streams: int = 0
    failed: int = 0
    sizes: Counter[int] = field(default_factory=Counter)

    def to_dict(self, waiting: int) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "largest_batch": max(self.sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "streams": self.streams,
            "failed_requests": self.failed,
            "waiting": waiting,
        }


class Batcher:
    """One worker thread runs every request on the backend. The requests waiting when it is free (up to
    ``max_batch`` for one target, oldest first) run as one batch; a request that finds the worker idle
    waits up to ``window_s`` for others to join it. A batch that fails is retried one request at a
    time, so one bad request fails alone."""

    def __init__(self, backend: TransformersBackend, *, max_batch: int, window_s: float) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError("need max_batch >= 1 and a batch window >= 0")
        self.backend = backend
        self.max_batch = max_batch
        self.window_s = window_s
        self.stats = BatchStats()
        self._waiting: list[_Job] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._work, name="serve-batcher", daemon=True).start()

    def metrics(self) -> dict[str, Any]:
        with self._cond:
            return self.stats.to_dict(len(self._waiting))

    async def run(self, target: str | None, request: ChatRequest | TextRequest) -> Completion:
        """Queue ``request`` and wait for its completion (raises what its generation raised)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Completion] = loop.create_future()
        self.submit(_Job(target, request, time.monotonic(), _settler(loop, future)))
        return await future

    def submit(self, job: _Job) -> None:
        with self._cond:
            self._waiting.append(job)
            self._cond.notify()

    def _take(self) -> list[_Job]:
        with self._cond:
            while not self._waiting:
                self._cond.wait()
            first = self._waiting[0]
            if first.on_text is not None:
                self._waiting.pop(0)
                return [first]
            deadline = first.arrived + self.window_s

            def batch() -> list[_Job]:
                same = [j for j in self._waiting if j.target == first.target and j.on_text is None]
                return same[: self.max_batch]

            while len(batch()) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            jobs = batch()
            taken = {id(j) for j in jobs}
            self._waiting = [j for j in self._waiting if id(j) not in taken]
            return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            for job, result in zip(jobs, self._run(jobs), strict=True):
                job.settle(result)

    def _run(self, jobs: list[_Job]) -> list[Completion | BaseException]:
        target = jobs[0].target
        try:
            with self.backend.use_adapter(target):
                results: list[Completion | BaseException] = list(
                    self.backend.complete([j.request for j in jobs], on_text=jobs[0].on_text)
                )
        except Exception as exc:
            if len(jobs) > 1:  # find the request that failed: the others still get their replies
                return [r for job in jobs for r in self._run([job])]
            with self._cond:
                self.stats.failed += 1
            return [exc]
        with self._cond:
            if jobs[0].on_text is not None:
                self.stats.streams += 1
            else:
                self.stats.batches += 1
                self.stats.rows += len(jobs)
                self.stats.sizes[len(jobs)] += 1
        return results


def _settler(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Completion]
) -> Callable[[Completion | BaseException], None]:
    """A thread-safe way to finish ``future`` with a result or an exception (unless it was cancelled:
    the client went away)."""

    def settle_now(result: Completion | BaseException) -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    def settle(result: Completion | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (server shutting down)
            loop.call_soon_threadsafe(settle_now, result)

    return settle


def _failure(exc: BaseException) -> JSONResponse:
    if isinstance(exc, LLMError):
        return _error(400, str(exc))
    # A bug or OOM: report it instead of dropping the connection.
    return _error(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")


def create_app(
    model_dir: str | Path,
    adapters: dict[str, Path] | None = None,
    served_name: str | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    max_batch: int = DEFAULT_MAX_BATCH,
    batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
) -> FastAPI:
    """Load the model (and adapters) once and return the OpenAI-compatible FastAPI app.

    The base model is served as ``served_name`` (default: the model directory's name); each
    adapter under its dictionary key. Requests that wait together run as batches of up to
    ``max_batch`` rows (see ``Batcher``).
    """
    adapters = dict(adapters or {})
    base_name = served_name or Path(model_dir).resolve().name
    if base_name in adapters:
        raise ValueError(f"adapter name {base_name!r} clashes with the served model name")
    backend = TransformersBackend(model_dir, device=device, dtype=dtype, batch_size=max_batch)
    for name, adapter_dir in adapters.items():
        backend.load_adapter(name, adapter_dir)
    batcher = Batcher(backend, max_batch=max_batch, window_s=batch_window_s)
    created = int(time.time())
    # Served name -> adapter name for use_adapter (None: the base model).
    targets: dict[str, str | None] = {base_name: None, **{name: name for name in adapters}}

    app = FastAPI(title="fspo serve-model", docs_url=None, redoc_url=None)
    app.state.backend = backend
    app.state.batcher = batcher

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> dict[str, Any]:
        return {**batcher.metrics(), "max_batch": max_batch, "batch_window_s": batch_window_s}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return _model_list(base_name, model_dir, adapters, created)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(http_request: Request) -> JSONResponse | StreamingResponse:
        parsed = await _read_request(http_request, _parse_body, targets)
        if isinstance(parsed, JSONResponse):
            return parsed
        model, request, stream, include_usage = parsed
        return await _chat_reply(batcher, targets[model], request, model, stream, include_usage)

    @app.post("/v1/completions", response_model=None)
    async def completions(http_request: Request) -> JSONResponse:
        parsed = await _read_request(http_request, _parse_text_body, targets)
        if isinstance(parsed, JSONResponse):
            return parsed
        model, requests = parsed
        return await _text_reply(batcher, targets[model], requests, model)

    return app


def _model_list(
    base_name: str, model_dir: str | Path, adapters: dict[str, Path], created: int
) -> dict[str, Any]:
    """``GET /v1/models``: the base model, then each adapter with the base as its parent."""
    data = [
        {
            "id": base_name,
            "object": "model",
            "created": created,
            "owned_by": "fspo",
            "root": str(model_dir),
            "parent": None,
        }
    ]
    data += [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "fspo",
            "root": str(path),
            "parent": base_name,
        }
        for name, path in adapters.items()
    ]
    return {"object": "list", "data": data}


_Parsed = TypeVar("_Parsed", bound=tuple[Any, ...])


async def _read_request(
    http_request: Request, parse: Callable[[Any], _Parsed], targets: dict[str, str | None]
) -> _Parsed | JSONResponse:
    """The request body parsed by ``parse`` (whose first field is the served model's name), or the
    error response: 400 for a body that is not JSON or that ``parse`` refuses, 404 for an unknown model."""
    try:
        body = json.loads(await http_request.body())
    except (ValueError, UnicodeDecodeError):
        return _error(400, "request body is not valid JSON")
    try:
        parsed = parse(body)
    except ValueError as exc:
        return _error(400, str(exc))
    if parsed[0] not in targets:
        return _unknown_model(parsed[0], targets)
    return parsed


async def _chat_reply(
    batcher: Batcher,
    target: str | None,
    request: ChatRequest,
    model: str,
    stream: bool,
    include_usage: bool,
) -> JSONResponse | StreamingResponse:
    """Run one chat request: streamed as SSE events, or as one ``chat.completion`` object."""
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if stream:
        return StreamingResponse(
            _stream(
                batcher,
                target,
                request,
                model=model,
                completion_id=completion_id,
                include_usage=include_usage,
            ),
            media_type="text/event-stream",
        )
    try:
        completion = await batcher.run(target, request)
    except Exception as exc:
        return _failure(exc)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                    "logprobs": _logprobs_json(completion.logprobs),
                }
            ],
            "usage": _usage(completion),
        }
    )


async def _text_reply(
    batcher: Batcher, target: str | None, requests: list[TextRequest], model: str
) -> JSONResponse:
    """Run plain-text prompts, each a row of its own (it may share a batch with other clients'
    requests), as one ``text_completion`` object; the first failure answers instead."""
    outcomes = await asyncio.gather(*(batcher.run(target, r) for r in requests), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            return _failure(outcome)
    results = [o for o in outcomes if isinstance(o, Completion)]
    prompt_tokens = sum(c.prompt_tokens for c in results)
    completion_tokens = sum(c.completion_tokens for c in results)
    return JSONResponse(
        {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                for i, c in enumerate(results)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


async def _stream(
    batcher: Batcher,
    target: str | None,
    request: ChatRequest,
    *,
    model: str,
    completion_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE events in OpenAI's ``chat.completion.chunk`` format, ending with ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def emit(kind: str, payload: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

    def settle(result: Completion | BaseException) -> None:
        emit("error" if isinstance(result, BaseException) else "done", result)

    created = int(time.time())

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        return f"data: {json.dumps(payload)}\n\n"

    # The batcher's worker pushes text as it appears; a stream runs as a batch of its own.
    batcher.submit(_Job(target, request, time.monotonic(), settle, on_text=lambda text: emit("text", text)))
    yield chunk({"role": "assistant", "content": ""})
    while True:
        kind, payload = await queue.get()
        if kind == "text":
            yield chunk({"content": payload})
        elif kind == "done":
            yield chunk({}, payload.finish_reason)
            if include_usage:
                usage = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(payload),
                }
                yield f"data: {json.dumps(usage)}\n\n"
            break
        else:
            kind_name = "invalid_request_error" if isinstance(payload, LLMError) else "server_error"
            yield f"data: {json.dumps({'error': {'message': str(payload), 'type': kind_name}})}\n\n"
            break
    yield "data: [DONE]\n\n"


def _adapter_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    if not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"adapter directory {path!r} does not exist")
    return name, Path(path)


def check_model_slots(model_dir: Path, adapters: dict[str, Path]) -> None:
    """Refuse a ``--model`` that is not a causal LM directory, and an ``--adapter`` that is not a LoRA
    adapter of that model (ModelError with a one-line message), before anything loads."""
    check_causal_lm_dir(model_dir)
    if (Path(model_dir) / "adapter_config.json").is_file():
        raise ModelError(
            f"{model_dir}: a LoRA adapter, not a base model; pass its base model as --model and "
            f"--adapter NAME={model_dir}"
        )
    for adapter_dir in adapters.values():
        check_adapter_base(adapter_dir, model_dir)


def serve_model_main(argv: list[str] | None = None) -> int:
    """Entry point of ``fspo serve-model``; returns the process exit code."""
    parser = _serve_parser()
    args = parser.parse_args(argv)
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        parser.error("adapter names must be unique")
    if args.max_batch < 1 or args.batch_window_ms < 0:
        parser.error("--max-batch must be >= 1 and --batch-window-ms >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    try:
        check_model_slots(args.model, adapters)
    except ModelError as exc:
        print(f"fspo serve-model: error: {exc}", file=sys.stderr)
        return 2

    import torch
    import uvicorn
    from transformers.utils import logging as hf_logging

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    try:
        app = create_app(
            args.model,
            adapters,
            args.served_name,
            device=args.device,
            dtype=args.dtype,
            max_batch=args.max_batch,
            batch_window_s=args.batch_window_ms / 1000,
        )
    except (LLMError, ValueError) as exc:
        print(f"fspo serve-model: error: {exc}", file=sys.stderr)
        return 1
    # On SIGTERM, requests still generating get a few seconds, not the minutes a CPU batch can take.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def _serve_parser() -> argparse.ArgumentParser:
    """The command line of ``fspo serve-model``."""
    parser = argparse.ArgumentParser(
        prog="fspo serve-model",
        description="Serve a local causal LM (and LoRA adapters) over an OpenAI-compatible HTTP API.",
    )
    parser.add_argument("--model", required=True, type=Path, help="local Hugging Face model directory")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        type=_adapter_arg,
        metavar="NAME=DIR",
        help="a peft LoRA adapter served under NAME (repeatable)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--served-name", default=None, help="name of the base model (default: the directory's name)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help=f"most requests run as one batch (default {DEFAULT_MAX_BATCH}; 1 serves one at a time)",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=DEFAULT_BATCH_WINDOW_S * 1000,
        help="how long a request that finds the model idle waits for others to batch with "
        f"(default {DEFAULT_BATCH_WINDOW_S * 1000:g})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads torch may use (default: torch's choice); 1 keeps a small model fast on a busy machine",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return parser


if __name__ == "__main__":
    raise SystemExit(serve_model_main())
