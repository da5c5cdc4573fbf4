"""Personalized generation with the shared few-shot prefix computed once, against plain batched
``model.generate`` on every full prompt (no prefix reuse), same run.

    ./run bench generate                       # tiny random model: 1 user, 8 shots, 8 questions, 64 tokens
    ./run bench generate --repeats 5 --new-tokens 32
    ./run bench generate --model ~/.cache/fspo/models/smollm2-135m --dataset /tmp/elix-gen \\
        --users 3 --shots 4 --questions 6 --new-tokens 32 --repeats 2 --lora

The workload is users of a procedural ELIX dataset (``--dataset``, or one built by ``fspo synth``'s
engine in a temp dir): each user's first ``--shots`` preference pairs from the held-out split as shots
(responses of ~100 tokens) and ``--questions`` held-out questions, all users in one call as an
evaluation or a study worker makes it. The model is ``--model`` (a Hugging Face directory, e.g. the
converted SmolLM2-135M-Instruct), or by default a random 4-layer, 256-wide Llama with a BPE tokenizer
trained on the dataset's text (built at start). Generation goes through ``LocalBackend``, the entry point
``fspo eval`` and the study worker use. ``--lora`` puts a random LoRA adapter on the model (shaped as
``fspo train --lora`` makes them: r 16, every linear layer) and adds a third mode, the prefix reuse on
the adapter left unmerged, against the merged adapter ``LocalBackend`` runs.

Each (mode, repeat) runs in a fresh subprocess, so its peak RSS is its own; the modes rotate so
background load hits them alike. The greedy outputs of prefix reuse and plain generate are checked to
be identical (an assertion, not a timing); the unmerged adapter's agreement is reported.
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

LABELS = {
    "reuse": "shared prefix once (`reuse_prefix=True`)",
    "plain": "plain `generate`, full prompts (`reuse_prefix=False`)",
    "reuse-unmerged": "shared prefix once, LoRA left unmerged",
}


def build_workload(tmp: Path, args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(model directory, adapter directory or None); writes workload.json (users) under ``tmp``."""
    from modeling.data import EpisodeSource

    dataset = args.dataset
    if dataset is None:
        from modeling.synth import generate_dataset

        dataset = tmp / "elix"
        generate_dataset(out_dir=dataset, domain="elix", users=60, pairs_per_user=20, seed=0)
    source = EpisodeSource(dataset, split="test")
    pool = list(dict.fromkeys(source.questions.text))
    users, seen = [], set()
    for episode in source.sample(args.users * 4, shots=args.shots, seed=0):
        if episode.user_id in seen or len(episode.shots) < args.shots:
            continue
        seen.add(episode.user_id)
        shot_questions = {p.question for p in episode.shots}
        offset = len(users) * args.questions  # different users get different questions
        rotated = pool[offset:] + pool[:offset]
        users.append(
            {
                "instruction": episode.instruction,
                "shots": [[p.question, p.chosen, p.rejected] for p in episode.shots],
                "questions": [q for q in rotated if q not in shot_questions][: args.questions],
            }
        )
        if len(users) == args.users:
            break
    (tmp / "workload.json").write_text(json.dumps(users))

    if args.model is not None:
        model_dir = args.model.expanduser()
    else:
        from modeling.tinymodel import build_tiny_causal_lm, train_tokenizer

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
    if not args.lora:
        return model_dir, None
    from modeling.tinymodel import random_lora_adapter

    return model_dir, random_lora_adapter(model_dir, tmp / "lora")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(
    mode: str,
    model_dir: Path,
    adapter: Path | None,
    workload_path: Path,
    new_tokens: int,
    threads: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> None:
    """One measurement: load, warm up, reset the RSS high-water mark, generate, print JSON."""
    import torch

    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    from modeling.data import Pair
    from modeling.infer import LocalBackend, UserQuestions

    hf_logging.disable_progress_bar()
    users = [
        UserQuestions(tuple(Pair(*s) for s in u["shots"]), tuple(u["questions"]), u["instruction"])
        for u in json.loads(workload_path.read_text())
    ]
    reuse = {"reuse_prefix": mode != "plain", "merge_adapter": mode != "reuse-unmerged"}
    backend = LocalBackend(model_dir, adapter=adapter, batch_size=8, device=device, dtype=dtype, **reuse)
    backend.generate(users[0].shots[:1], ["Warm up."], instruction=users[0].instruction, max_new_tokens=2)
    try:  # reset VmHWM so the peak below is this run's own (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        peak_field = "VmHWM"
    except OSError:
        peak_field = ""
    rss_before = _rss_kb("VmRSS")
    start = time.perf_counter()
    generations = backend.generate_many(users, max_new_tokens=new_tokens, temperature=0.0)
    seconds = time.perf_counter() - start
    stats = backend.last_stats
    peak = _rss_kb(peak_field) if peak_field else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "mode": mode,
                "seconds": seconds,
                "new_tokens": stats.new_tokens,
                "questions": stats.questions,
                "prompt_tokens": stats.prompt_tokens,
                "prompt_tokens_computed": stats.prompt_tokens_computed,
                "prefix_tokens": stats.prefix_tokens,
                "fallbacks": stats.fallbacks,
                "shots_cut": stats.shots_cut,
                "rss_delta_mb": (peak - rss_before) / 1024,
                "texts": [g.text for gens in generations for g in gens],
            }
        )
    )


def main() -> None:
    args = _parser().parse_args()
    if args.child:
        child(
            *(args.child, args.model_dir, args.adapter, args.workload, args.new_tokens, args.threads),
            *(args.device, args.dtype),
        )
        return

    command = "./run bench generate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"$ {command.strip()}")
    print(
        f"machine: {os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.1f}; "
        f"torch threads per run: {args.threads}"
    )
    modes = ["reuse", "plain"] + (["reuse-unmerged"] if args.lora else [])
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        model_dir, adapter = build_workload(tmp, args)
        print(
            f"built the workload{' and model' if args.model is None else ''} in {time.perf_counter() - start:.1f} s"
        )
        runs = measure(args, modes, model_dir, adapter, tmp / "workload.json")

    texts = {json.dumps(run["texts"]) for mode in ("reuse", "plain") for run in runs[mode]}
    assert len(texts) == 1, "greedy outputs differ between prefix reuse and plain generate"
    first = runs["reuse"][0]
    assert first["fallbacks"] == 0, f"{first['fallbacks']} questions fell back to full prompts"
    report(args, modes, runs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (default 1: on a small shared machine, multi-threaded GEMMs "
        "mostly measure the other load)",
    )
    parser.add_argument(
        "--model", type=Path, help="a Hugging Face model directory (default: a tiny random Llama)"
    )
    parser.add_argument(
        "--dataset", type=Path, help="an ELIX dataset directory (default: one built in a temp dir)"
    )
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--questions", type=int, default=8, help="questions per user")
    parser.add_argument("--lora", action="store_true", help="a random LoRA adapter: merged vs unmerged too")
    parser.add_argument("--device", default="cpu", help="where the model generates (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", help="the weights' dtype (float32, bfloat16)")
    parser.add_argument("--child", choices=sorted(LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workload", type=Path, help=argparse.SUPPRESS)
    return parser


def measure(
    args: argparse.Namespace, modes: list[str], model_dir: Path, adapter: Path | None, workload: Path
) -> dict[str, list[dict]]:
    """Every (repeat, mode) in a fresh subprocess (``child``), the modes rotating; each run's JSON."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for r in range(args.repeats):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--model-dir",
                str(model_dir),
                "--workload",
                str(workload),
                "--new-tokens",
                str(args.new_tokens),
                "--threads",
                str(args.threads),
                *("--device", args.device, "--dtype", args.dtype),
            ]
            if adapter is not None:
                cmd += ["--adapter", str(adapter)]
            out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    return runs


def report(args: argparse.Namespace, modes: list[str], runs: dict[str, list[dict]]) -> None:
    """The table of modes, the speed-up and the outputs' agreement."""
    first = runs["reuse"][0]

    def median_s(mode: str) -> float:
        return statistics.median(r["seconds"] for r in runs[mode])

    def row(mode: str) -> str:
        rss = statistics.median(r["rss_delta_mb"] for r in runs[mode])
        r0 = runs[mode][0]
        return (
            f"| {LABELS[mode]} | {median_s(mode):.2f} | {r0['new_tokens'] / median_s(mode):.1f} | "
            f"{r0['prompt_tokens_computed']:,} | {rss:.0f} |"
        )

    model = args.model.name if args.model is not None else "tiny random Llama"
    print()
    print(
        f"{model}{' + random LoRA (r 16, all linear)' if args.lora else ''}: {args.users} user(s) x "
        f"{args.questions} questions, {args.shots} shots, greedy {args.new_tokens} new tokens, batch 8, "
        f"float32 CPU; shared prefixes {first['prefix_tokens']:,} tokens in all, all prompts "
        f"{first['prompt_tokens']:,} tokens, shots cut {first['shots_cut']}; median of {args.repeats}"
    )
    print()
    print("| mode | median s | generated tok/s | prompt tokens run (padding incl.) | peak RSS delta (MB) |")
    print("|---|---:|---:|---:|---:|")
    for mode in modes:
        print(row(mode))
    print()
    print(f"speed-up: {median_s('plain') / median_s('reuse'):.2f}x (plain / reuse, median seconds)")
    print(
        f"greedy outputs identical in all {2 * args.repeats} reuse and plain runs: yes "
        f"({first['new_tokens']} tokens each run)"
    )
    if args.lora:
        same = sum(
            a == b
            for run in runs["reuse-unmerged"]
            for a, b in zip(run["texts"], first["texts"], strict=True)
        )
        print(
            f"merged adapter: {median_s('reuse-unmerged') / median_s('reuse'):.2f}x faster than unmerged "
            f"(median seconds); unmerged replies equal to merged: {same} of {len(first['texts']) * args.repeats}"
        )


if __name__ == "__main__":
    main()
