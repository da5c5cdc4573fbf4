"""Personalized generation with the shared few-shot prefix computed once, against plain batched
``model.generate`` on every full prompt (no prefix reuse), same run.

    ./run bench generate                       # 8 shots, 8 questions, greedy 64 new tokens, 3 repeats
    ./run bench generate --repeats 5 --new-tokens 32

The workload is one user of a procedural ELIX dataset (``fspo synth``'s engine, built in a temp dir):
8 of their preference pairs as shots (responses of ~100 tokens, so the shared prefix is ~2k tokens)
and 8 held-out questions. The model is a random 4-layer, 256-wide Llama with a BPE tokenizer trained on
the dataset's text (built at start). Each (mode, repeat) runs in a fresh subprocess, so its peak RSS is
its own; the modes alternate so background load hits both alike. The greedy outputs of the two modes
are checked to be identical (an assertion, not a timing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_SHOTS = 8
N_QUESTIONS = 8


def build_workload(tmp: Path) -> Path:
    """The model directory and workload.json (shots, questions, instruction) under ``tmp``."""
    from modeling.data import EpisodeSource
    from modeling.synth import generate_dataset
    from modeling.tinymodel import build_tiny_causal_lm, train_tokenizer

    generate_dataset(out_dir=tmp / "elix", domain="elix", users=60, pairs_per_user=20, seed=0)
    source = EpisodeSource(tmp / "elix", split="test")
    episode = source.sample(1, shots=N_SHOTS, seed=0)[0]
    shot_questions = {p.question for p in episode.shots}
    questions = [q for q in dict.fromkeys(source.questions.text) if q not in shot_questions][:N_QUESTIONS]
    texts = list(source.responses) + list(source.questions.text)
    tokenizer = train_tokenizer(texts, tmp / "tokenizer", vocab_size=1024)
    model_dir = build_tiny_causal_lm(
        tmp / "model",
        tokenizer,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=1024,
        max_position_embeddings=4096,
    )
    workload = {
        "instruction": episode.instruction,
        "shots": [[p.question, p.chosen, p.rejected] for p in episode.shots],
        "questions": questions,
    }
    (tmp / "workload.json").write_text(json.dumps(workload))
    return model_dir


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(mode: str, model_dir: Path, workload_path: Path, new_tokens: int, threads: int) -> None:
    """One measurement: load, warm up, reset the RSS high-water mark, generate, print JSON."""
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from modeling.data import Pair
    from modeling.infer import GenerationStats, generate_personalized

    hf_logging.disable_progress_bar()
    workload = json.loads(workload_path.read_text())
    shots = [Pair(*s) for s in workload["shots"]]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reuse = mode == "reuse"
    options = {
        "instruction": workload["instruction"],
        "temperature": 0.0,
        "reuse_prefix": reuse,
        "batch_size": 8,
    }
    generate_personalized(model, tokenizer, shots[:1], ["Warm up."], max_new_tokens=2, **options)
    try:  # reset VmHWM so the peak below is this run's own (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        peak_field = "VmHWM"
    except OSError:
        peak_field = ""
    rss_before = _rss_kb("VmRSS")
    stats = GenerationStats()
    start = time.perf_counter()
    generations = generate_personalized(
        model, tokenizer, shots, workload["questions"], max_new_tokens=new_tokens, stats=stats, **options
    )
    seconds = time.perf_counter() - start
    peak = _rss_kb(peak_field) if peak_field else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "mode": mode,
                "seconds": seconds,
                "new_tokens": stats.new_tokens,
                "prompt_tokens": stats.prompt_tokens,
                "prompt_tokens_computed": stats.prompt_tokens_computed,
                "prefix_tokens": stats.prefix_tokens,
                "fallbacks": stats.fallbacks,
                "rss_delta_mb": (peak - rss_before) / 1024,
                "texts": [g.text for g in generations],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (default 1: on a small shared machine, multi-threaded tiny GEMMs "
        "mostly measure the other load)",
    )
    parser.add_argument("--child", choices=["reuse", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workload", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.workload, args.new_tokens, args.threads)
        return

    command = "./run bench generate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"$ {command.strip()}")
    print(
        f"machine: {os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.1f}; "
        f"torch threads per run: {args.threads}"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        model_dir = build_workload(tmp)
        print(f"built the workload and model in {time.perf_counter() - start:.1f} s")
        runs: dict[str, list[dict]] = {"reuse": [], "plain": []}
        for r in range(args.repeats):
            order = ("reuse", "plain") if r % 2 == 0 else ("plain", "reuse")
            for mode in order:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--model",
                    str(model_dir),
                    "--workload",
                    str(tmp / "workload.json"),
                    "--new-tokens",
                    str(args.new_tokens),
                    "--threads",
                    str(args.threads),
                ]
                out = subprocess.run(
                    cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True
                ).stdout
                runs[mode].append(json.loads(out.strip().splitlines()[-1]))

    texts = {json.dumps(run["texts"]) for mode in runs for run in runs[mode]}
    assert len(texts) == 1, "greedy outputs differ between prefix reuse and plain generate"
    first = runs["reuse"][0]
    assert first["fallbacks"] == 0, f"{first['fallbacks']} questions fell back to full prompts"

    def row(mode: str, label: str) -> tuple[str, float]:
        median = statistics.median(r["seconds"] for r in runs[mode])
        rss = statistics.median(r["rss_delta_mb"] for r in runs[mode])
        r0 = runs[mode][0]
        line = (
            f"| {label} | {median:.2f} | {r0['new_tokens'] / median:.1f} | "
            f"{r0['prompt_tokens_computed']:,} | {rss:.0f} |"
        )
        return line, median

    reuse_line, reuse_s = row("reuse", "shared prefix once (`reuse_prefix=True`)")
    plain_line, plain_s = row("plain", "plain `generate`, full prompts (`reuse_prefix=False`)")
    print()
    print(
        f"{N_SHOTS} shots, {N_QUESTIONS} questions, greedy {args.new_tokens} new tokens, batch 8, float32 CPU; "
        f"shared prefix {first['prefix_tokens']:,} tokens, all prompts {first['prompt_tokens']:,} tokens; "
        f"median of {args.repeats}"
    )
    print()
    print("| mode | median s | generated tok/s | prompt tokens run (padding incl.) | peak RSS delta (MB) |")
    print("|---|---:|---:|---:|---:|")
    print(reuse_line)
    print(plain_line)
    print()
    print(f"speed-up: {plain_s / reuse_s:.2f}x (plain / reuse, median seconds)")
    print(
        f"greedy outputs identical in all {2 * args.repeats} runs: yes ({first['new_tokens']} tokens each run)"
    )


if __name__ == "__main__":
    main()
