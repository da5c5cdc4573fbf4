"""``fspo serve-model``: an OpenAI-compatible HTTP server for a local model and its LoRA adapters.

It lets the data engine, the judges and the study workers talk to our own checkpoints exactly as
they talk to vLLM or a hosted endpoint. Generation and choice scoring are ``TransformersBackend``'s;
this module only translates HTTP. Requests are served one at a time (one model in memory).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (``stream``, ``seed``,
``guided_choice``; ``model`` picks the base model or an adapter by name), ``POST /v1/completions``
(plain-text prompts, no chat template, as FSPO's Markdown prompts need; a string or a list of strings,
``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``), ``GET /health``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from modeling.llm import ChatRequest, Completion, LLMError, TextRequest, TransformersBackend


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
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
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
    fields: dict[str, Any] = {"messages": messages}
    for key, value in (
        ("max_tokens", max_tokens),
        ("temperature", body.get("temperature")),
        ("top_p", body.get("top_p")),
        ("seed", body.get("seed")),
        ("choices", body.get("guided_choice")),
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


def create_app(
    model_dir: str | Path,
    adapters: dict[str, Path] | None = None,
    served_name: str | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> FastAPI:
    """Load the model (and adapters) once and return the OpenAI-compatible FastAPI app.

    The base model is served as ``served_name`` (default: the model directory's name); each
    adapter under its dictionary key.
    """
    adapters = dict(adapters or {})
    base_name = served_name or Path(model_dir).resolve().name
    if base_name in adapters:
        raise ValueError(f"adapter name {base_name!r} clashes with the served model name")
    backend = TransformersBackend(model_dir, device=device, dtype=dtype)
    for name, adapter_dir in adapters.items():
        backend.load_adapter(name, adapter_dir)
    created = int(time.time())
    # Served name -> adapter name for use_adapter (None: the base model).
    targets: dict[str, str | None] = {base_name: None, **{name: name for name in adapters}}

    app = FastAPI(title="fspo serve-model", docs_url=None, redoc_url=None)
    app.state.backend = backend

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
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

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(http_request: Request) -> JSONResponse | StreamingResponse:
        try:
            body = json.loads(await http_request.body())
        except (ValueError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        try:
            model, request, stream, include_usage = _parse_body(body)
        except ValueError as exc:
            return _error(400, str(exc))
        if model not in targets:
            return _unknown_model(model, targets)
        target = targets[model]
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if stream:
            return StreamingResponse(
                _stream(
                    backend,
                    target,
                    request,
                    model=model,
                    completion_id=completion_id,
                    include_usage=include_usage,
                ),
                media_type="text/event-stream",
            )

        def run() -> Completion:
            with backend.use_adapter(target):
                return backend.complete([request])[0]

        try:
            completion = await run_in_threadpool(run)
        except LLMError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # a bug or OOM: report it instead of dropping the connection
            return _error(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")
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
                        "logprobs": None,
                    }
                ],
                "usage": _usage(completion),
            }
        )

    @app.post("/v1/completions", response_model=None)
    async def completions(http_request: Request) -> JSONResponse:
        try:
            body = json.loads(await http_request.body())
        except (ValueError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        try:
            model, requests = _parse_text_body(body)
        except ValueError as exc:
            return _error(400, str(exc))
        if model not in targets:
            return _unknown_model(model, targets)
        target = targets[model]

        def run() -> list[Completion]:
            with backend.use_adapter(target):
                return backend.complete_text(requests)

        try:
            results = await run_in_threadpool(run)
        except LLMError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # a bug or OOM: report it instead of dropping the connection
            return _error(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")
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

    return app


async def _stream(
    backend: TransformersBackend,
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

    def work() -> None:
        try:
            with backend.use_adapter(target):
                completion = backend.complete([request], on_text=lambda text: emit("text", text))[0]
            emit("done", completion)
        except Exception as exc:
            emit("error", exc)

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

    # Generation runs in its own thread (not the request's) so it can push text as it appears.
    threading.Thread(target=work, name="serve-stream", daemon=True).start()
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


def serve_model_main(argv: list[str] | None = None) -> int:
    """Entry point of ``fspo serve-model``; returns the process exit code."""
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
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    args = parser.parse_args(argv)
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        parser.error("adapter names must be unique")

    import uvicorn
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        app = create_app(args.model, adapters, args.served_name, device=args.device, dtype=args.dtype)
    except (LLMError, ValueError) as exc:
        print(f"fspo serve-model: error: {exc}", file=sys.stderr)
        return 1
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_model_main())
