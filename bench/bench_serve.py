"""`fspo serve-model` requests per second with batching against one request at a time, same run.

    ./run bench serve                          # SmolLM2-135M-Instruct (fspo models pull smollm2-135m)
    ./run bench serve --requests 8 --max-tokens 32 --repeats 3
    ./run bench serve --model DIR --threads 2

Two real `fspo serve-model` subprocesses hold the same model: one batches the requests waiting together
(``--max-batch`` rows), the peer serves them one at a time (``--max-batch 1``, what serve-model did
before batching). Each round sends the same ``--requests`` chat requests (distinct questions, greedy,
``--max-tokens`` new tokens, plus one seeded sampled request) all at once from as many client threads,
first to one server and then to the other, the order alternating by round so background load hits both
alike. Only one server works at a time. The replies of both are checked to be identical (greedy and
seeded sampling are the same batched or alone: an assertion, not a timing), and the batched server's
``/metrics`` shows how the requests were grouped.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "How do tides work?",
    "Why is the sky blue?",
    "What makes bread rise?",
    "How does a bicycle stay upright?",
    "Why do cats purr?",
    "What is a black hole?",
    "How do vaccines work?",
    "Why do leaves change colour in autumn?",
    "How does a refrigerator keep food cold?",
    "What causes thunder?",
    "How do bees make honey?",
    "Why is the ocean salty?",
    "How does a rainbow form?",
    "What is inflation in economics?",
    "How do magnets work?",
    "Why do we dream?",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(model: Path, max_batch: int, threads: int, log: Path) -> Iterator[str]:
    """A real `fspo serve-model` subprocess; yields its base URL (without /v1)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "modeling.serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--served-name",
        "m",
        "--max-batch",
        str(max_batch),
        "--threads",
        str(threads),
        "--log-level",
        "warning",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve-model exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"serve-model not ready after 300 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def bodies(n: int, max_tokens: int) -> list[dict[str, Any]]:
    out = [
        {
            "model": "m",
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for i in range(n - 1)
    ]
    out.append({**out[0], "temperature": 0.8, "seed": 7})  # a sampled row keeps its own seed
    return out


def burst(url: str, requests: list[dict[str, Any]]) -> tuple[float, list[str], int]:
    """Send every request at once; (seconds, replies, completion tokens)."""
    with httpx.Client(timeout=900, limits=httpx.Limits(max_connections=len(requests))) as client:

        def one(body: dict[str, Any]) -> dict[str, Any]:
            response = client.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()

        start = time.perf_counter()
        with ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(one, requests))
        seconds = time.perf_counter() - start
    texts = [r["choices"][0]["message"]["content"] for r in replies]
    return seconds, texts, sum(r["usage"]["completion_tokens"] for r in replies)


def main() -> None:
    from modeling.models import models_dir

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=models_dir() / "smollm2-135m")
    parser.add_argument("--requests", type=int, default=8, help="requests sent at once each round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    args = parser.parse_args()
    if not args.model.is_dir():
        raise SystemExit(f"{args.model} is not a model directory (fspo models pull smollm2-135m)")

    print(f"$ ./run bench serve {' '.join(shlex.quote(a) for a in sys.argv[1:])}".strip())
    print(
        f"machine: {os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.1f}; "
        f"torch threads per server: {args.threads}"
    )
    modes = {"batched": args.requests, "one at a time": 1}
    runs, batches = measure(args, modes)
    report(args, modes, runs, batches)


def measure(
    args: argparse.Namespace, modes: dict[str, int]
) -> tuple[dict[str, list[tuple[float, int]]], dict[str, Any]]:
    """Rounds of the same burst against one server per mode (the modes alternating): each round's
    (seconds, completion tokens) by mode, and the batched server's batch counts over the rounds.
    Exits if replies change between rounds or between the modes."""
    work = bodies(args.requests, args.max_tokens)
    runs: dict[str, list[tuple[float, int]]] = {m: [] for m in modes}
    seen: dict[str, list[str]] = {}
    with ExitStack() as stack:
        logs = Path(stack.enter_context(__import__("tempfile").TemporaryDirectory(prefix="bench-serve-")))
        urls = {
            m: stack.enter_context(server(args.model, b, args.threads, logs / f"{b}.log"))
            for m, b in modes.items()
        }
        for url in urls.values():  # warm up: first-call allocations are not what is measured
            burst(url, work[:1])
        before = httpx.get(f"{urls['batched']}/metrics").json()
        names = list(modes)
        for r in range(args.repeats):
            for mode in names[r % 2 :] + names[: r % 2]:
                seconds, texts, tokens = burst(urls[mode], work)
                runs[mode].append((seconds, tokens))
                if seen.setdefault(mode, texts) != texts:
                    raise SystemExit(f"{mode}: replies changed between rounds")
        after = httpx.get(f"{urls['batched']}/metrics").json()
    if seen["batched"] != seen["one at a time"]:
        raise SystemExit("batched replies differ from the ones served one at a time")
    sizes = {
        k: after["batch_sizes"].get(k, 0) - before["batch_sizes"].get(k, 0) for k in after["batch_sizes"]
    }
    return runs, {
        "batches": after["batches"] - before["batches"],
        "rows": after["rows"] - before["rows"],
        "sizes": sizes,
    }


def report(
    args: argparse.Namespace,
    modes: dict[str, int],
    runs: dict[str, list[tuple[float, int]]],
    batches: dict[str, Any],
) -> None:
    """The table of servers, the speed-up and the batched server's batches."""

    def median_s(mode: str) -> float:
        return statistics.median(s for s, _ in runs[mode])

    tokens = runs["batched"][0][1]
    print()
    print(
        f"{args.model.name}: {args.requests} chat requests at once ({args.requests - 1} greedy, 1 sampled with a "
        f"seed), {args.max_tokens} new tokens at most, float32 CPU; median of {args.repeats} rounds"
    )
    print()
    print("| server | median s | requests/s | generated tok/s |")
    print("|---|---:|---:|---:|")
    for mode in modes:
        s = median_s(mode)
        print(
            f"| {mode} (`--max-batch {modes[mode]}`) | {s:.2f} | {args.requests / s:.2f} | {tokens / s:.1f} |"
        )
    print()
    print(
        f"speed-up: {median_s('one at a time') / median_s('batched'):.2f}x (one at a time / batched, median seconds)"
    )
    print(
        f"batched server: {batches['batches']} batches for "
        f"{batches['rows']} requests (batches by rows: "
        f"{', '.join(f'{k}: {v}' for k, v in batches['sizes'].items() if v)})"
    )
    print(f"replies identical batched and one at a time in all rounds: yes ({tokens} tokens each round)")


if __name__ == "__main__":
    main()
