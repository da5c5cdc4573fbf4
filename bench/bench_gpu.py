"""The GPU bench, one prepared script of about 8 minutes on one H100 (not run here: no GPU is lent).

    ./run bench gpu                   # on a GPU host: Llama-3.2-3B-shaped model, bf16, ~8k-token prompts
    ./run bench gpu --shots 8 16      # ~4k- and ~8k-token prompts (about 3 more minutes)
    ./run bench gpu --smoke           # the same code at tiny sizes, on the CPU, in under a minute

1. IPO training, FSPO's packed shared-prefix loop (``modeling.train.train``) against TRL's
   ``DPOTrainer(loss_type="ipo")`` in the same run, through ``bench/bench_train.py``'s peers (``one``:
   the same episodes and token ids on both sides, each peer in its own subprocess), in its GPU profile:
   bfloat16 weights on both sides, gradient checkpointing on both, no prompt cut on either side, full
   fine-tuning (``--lora``: LoRA r 16 both sides), batch 4, AdamW (bench_train's settings). Reported:
   pair tokens/s (prompt + chosen + rejected of each pair, the same count on both sides), input tokens
   the GPU ran per second (padding included; TRL runs the prompt twice), peak GPU memory, and MFU:
   (6 N + 12 L h T) FLOPs per input token (N the non-embedding parameters, T the row's length: PaLM's
   convention; the logits' matmul and the recomputation of checkpointing are not counted) over the
   GPU's dense bf16 peak. The reference passes (ours precomputed before the loop, TRL's each step) are
   outside the timed window and the FLOPs. A peer that runs out of GPU memory is reported as such
   (TRL keeps the logits of every position: [2 x batch, T, vocab]) and the bench goes on.
2. Personalized generation with the few-shot prefix encoded once against plain ``generate``, through
   ``bench/bench_generate.py``'s measurement (``LocalBackend``, the worker's entry point), on the GPU in
   bfloat16: generated tokens/s, prompt tokens run, and how often the two agree (greedy decoding on a
   random model is near-tied, so bf16 rounding can flip a token: agreement is reported, not asserted).

The model is random (the public Llama-3.2-3B config, ``docs/configs/llama-3.2-3b/model-config.json``),
made on the GPU and saved once; its tokenizer is a byte-level BPE trained on the bench's ELIX dataset with
a vocabulary of 300 (``TOKENIZER_VOCAB``: about one token per byte), so that prompts are as long in
tokens as real ones of longer responses: measured here, 8 shots of ELIX make 3,900-token prompts and
16 shots about 7,800 (the default: the paper's 8k-token prompts; ELIX's responses are ~190 bytes). The
mean pair length is printed. ``--smoke`` runs every step with a
64-wide 2-layer model on the CPU (float32, no checkpointing: the CPU profile) to show the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_generate  # noqa: E402
import bench_train  # noqa: E402

MODEL_CONFIG = ROOT / "docs" / "configs" / "llama-3.2-3b" / "model-config.json"
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
SMOKE_SHAPE |= {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
TOKENIZER_VOCAB = 300
# Dense bf16 peak FLOP/s by device name (the vendors' datasheets, SXM parts, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
KINDS = ("ours", "trl")


def prepare(work: Path, smoke: bool) -> dict[str, Any]:
    """The dataset (bench_train's), the tokenizer and the random model under ``work``; its shape."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from modeling.data import EpisodeSource
    from modeling.tinymodel import train_tokenizer

    bench_train.prepare(work, tiny=False)
    src = EpisodeSource(work / "ds", split="train")
    tok = train_tokenizer(
        [*src.questions.text, *src.responses[:5000]], work / "tok", vocab_size=TOKENIZER_VOCAB
    )
    config = LlamaConfig.from_json_file(str(MODEL_CONFIG))
    if smoke:
        for k, v in SMOKE_SHAPE.items():
            setattr(config, k, v)
    config.vocab_size = max(config.vocab_size if not smoke else 0, len(tok))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, None
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.save_pretrained(work / "init", safe_serialization=True)
    tok.save_pretrained(work / "init")
    blocks = model.model.layers
    embedding = model.get_input_embeddings().weight.numel()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "non_embedding_params": sum(p.numel() for p in model.parameters()) - embedding,
        "layers": len(blocks),
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
    }


def train_peer(kind: str, shots: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One training peer in this (child) process: bench_train's ``one`` in the GPU profile."""
    bench_train.use_profile(max_prompt_tokens=16384)  # TRL's side is never cut: neither may ours be
    if not args.smoke:
        bench_train.use_profile(dtype="bfloat16", gradient_checkpointing=True)
    steps = args.warmup + args.steps
    return bench_train.one(
        kind, shots, work, work / "init", args.lora, steps, args.warmup, args.batch, targets=1
    )


def mfu(res: dict[str, Any], shape: dict[str, Any], rows: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of the timed steps (see the module docstring)."""
    if peak is None:
        return None
    warm = len(res["processed_tokens"]) - len(res["step_seconds"])
    flops = 0.0
    for tokens in res["processed_tokens"][warm:]:
        width = tokens / rows
        flops += tokens * (6 * shape["non_embedding_params"] + 12 * shape["layers"] * shape["hidden"] * width)
    return flops / res["timed_seconds"] / peak


def _peak_flops(args: argparse.Namespace) -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "CPU", None
    name = torch.cuda.get_device_name()
    if args.peak_tflops:
        return name, args.peak_tflops * 1e12
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak is None:
        raise SystemExit(f"no dense bf16 peak known for {name}: give --peak-tflops")
    return name, peak


def bench_training(work: Path, shape: dict[str, Any], args: argparse.Namespace) -> None:
    """Every peer at every shot count in its own subprocess; a table of throughput, MFU, memory."""
    device, peak = _peak_flops(args)
    print(f"\n## IPO training on {device}: ours (packed shared prefix) vs TRL DPOTrainer(loss_type='ipo')\n")
    print(
        "| shots | peer | mean pair tokens | pairs/s | pair tokens/s | input tokens/s | MFU | peak GPU GiB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for shots in args.shots:
        results = {kind: _child(["--train", kind, str(shots)], work, args) for kind in KINDS}
        if all(results.values()):
            assert results["ours"]["pair_tokens"] == results["trl"]["pair_tokens"]  # the same pairs
        for kind, res in results.items():
            if res is None:
                print(f"| {shots} | {kind} | out of GPU memory | | | | | |")
                continue
            rows = args.batch * (2 if kind.startswith("trl") else 1)  # TRL: chosen and rejected rows
            warm = args.warmup
            timed = [t for step in res["pair_tokens"][warm:] for t in step]
            u = mfu(res, shape, rows, peak)
            gpu = res.get("peak_gpu_mb")
            print(
                f"| {shots} | {kind} | {statistics.mean(timed):,.0f} | {res['pairs_per_s']:.2f} | "
                f"{res['pair_tokens_per_s']:,.0f} | {sum(res['processed_tokens'][warm:]) / res['timed_seconds']:,.0f} | "
                f"{'n/a' if u is None else f'{100 * u:.1f}%'} | {'n/a' if gpu is None else f'{gpu / 1024:.1f}'} |"
            )


def bench_generation(work: Path, args: argparse.Namespace) -> None:
    """bench_generate's measurement on the bench's model: prefix reuse vs plain, on the GPU in bf16."""
    gen = argparse.Namespace(
        dataset=work / "ds",
        model=work / "init",
        users=args.gen_users,
        shots=max(args.shots),
        questions=args.gen_questions,
        lora=False,
        repeats=1 if args.smoke else 2,
        new_tokens=8 if args.smoke else 64,
        threads=2,
        device="cpu" if args.smoke else "cuda",
        dtype="float32" if args.smoke else "bfloat16",
    )
    model_dir, _ = bench_generate.build_workload(work, gen)
    runs = bench_generate.measure(gen, ["reuse", "plain"], model_dir, None, work / "workload.json")
    print(
        f"\n## Personalized generation: {gen.users} users x {gen.questions} questions, {gen.shots} shots, "
        f"greedy {gen.new_tokens} new tokens, batch 8, {gen.device} {gen.dtype}, median of {gen.repeats}\n"
    )
    print("| mode | median s | generated tok/s | prompt tokens run | shared prefix tokens |")
    print("|---|---:|---:|---:|---:|")
    for mode in ("reuse", "plain"):
        seconds = statistics.median(r["seconds"] for r in runs[mode])
        r0 = runs[mode][0]
        print(
            f"| {bench_generate.LABELS[mode]} | {seconds:.2f} | {r0['new_tokens'] / seconds:,.0f} | "
            f"{r0['prompt_tokens_computed']:,} | {r0['prefix_tokens']:,} |"
        )
    pairs = list(zip(runs["reuse"][0]["texts"], runs["plain"][0]["texts"], strict=True))
    print(f"\nreplies equal with and without prefix reuse: {sum(a == b for a, b in pairs)} of {len(pairs)}")


def _child(extra: list[str], work: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """Run this script's ``--train`` child and return its JSON (its peak memory is its own); None if
    it ran out of GPU memory."""
    cmd = [sys.executable, __file__, *extra, "--work", str(work), *_common(args)]
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / f"hf-datasets-{'-'.join(extra)}")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode and "OutOfMemoryError" in proc.stderr:
        return None
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(extra)} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _common(args: argparse.Namespace) -> list[str]:
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    return flags + (["--smoke"] if args.smoke else []) + (["--lora"] if args.lora else [])


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (under a minute)")
    p.add_argument("--shots", type=int, nargs="+", default=None, help="shot counts (default 16; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 2; smoke 1)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step (the paper's 4)")
    p.add_argument("--lora", action="store_true", help="LoRA r 16 on both sides instead of full fine-tuning")
    p.add_argument("--gen-users", type=int, default=8, help="users in the generation call")
    p.add_argument("--gen-questions", type=int, default=4, help="questions per user")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    p.add_argument("--work", type=Path, default=None, help="a folder to keep the model and data in")
    p.add_argument("--train", nargs=2, metavar=("KIND", "SHOTS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.gen_users, args.gen_questions = min(args.gen_users, 2), min(args.gen_questions, 2)
    args.shots = args.shots or ([2] if args.smoke else [16])
    args.steps = args.steps or (2 if args.smoke else 6)
    args.warmup = args.warmup or (1 if args.smoke else 2)
    return args


def main() -> int:
    args = _args()
    bench_train._env()
    if args.train:  # a child: one training peer
        res = train_peer(args.train[0], int(args.train[1]), args.work, args)
        print(json.dumps(res))
        return 0
    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    if not (work / "shape.json").exists():
        (work / "shape.json").write_text(json.dumps(prepare(work, args.smoke)))
    shape = json.loads((work / "shape.json").read_text())
    print(f"$ ./run bench gpu {' '.join(sys.argv[1:])}")
    print(
        f"model: random Llama, {shape['params'] / 1e9:.3g}B params ({shape['layers']} layers, hidden "
        f"{shape['hidden']}, vocab {shape['vocab']}); prepared in {time.perf_counter() - start:.0f} s"
    )
    bench_training(work, shape, args)
    bench_generation(work, args)
    print(f"\nwhole bench: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
