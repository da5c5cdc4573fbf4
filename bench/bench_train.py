"""FSPO IPO training throughput and peak memory against TRL's ``DPOTrainer(loss_type="ipo")``, same run.

    ./run bench train                          # 4 and 8 shots, batch 4, 2 warm-up + 12 timed steps
    ./run bench train --shots 8 --steps 6      # a shorter timed window
    ./run bench train --model /root/.cache/fspo/models/smollm2-135m --lora
                                               # a real model, LoRA both sides: 2 and 4 shots, batch 2,
                                               # 1 warm-up + 3 timed steps (39 min on 2 shared cores)

Workload: a procedural ELIX dataset (``fspo synth``'s engine, 600 users x 12 pairs, built in a temp dir)
and a random tiny Llama (hidden 128, 4 layers, 4 heads, intermediate 384, tied embeddings) with a byte-level
BPE tokenizer (vocab 1024) trained on the dataset's text -- ``modeling.train.build_tiny_model``, built once
and saved, so every run starts from the same weights. float32, CPU, 2 torch threads everywhere.

Three peers per shot count, each in a fresh subprocess so its peak RSS (ru_maxrss) is its own:

- ``ours``: ``modeling.train.train(TrainConfig(stage="ipo", ...))`` itself, on that init checkpoint. Its
  loop body is the real one: ``_examples`` (tokenize the step's episodes), ``_pref_loss`` (``packed_pair_logps``:
  one row [prompt | chosen | rejected] per pair, then ``ipo_loss``), backward, clip, AdamW. The reference
  log-probs are precomputed before the loop by ``_reference_logps``, as the stage always does; that pass is
  timed separately (by wrapping the function, not re-implementing it).
- ``trl``: ``DPOTrainer(model, ref_model=<frozen copy>, DPOConfig(loss_type="ipo"))``; ``trainer.train()``.
  Each step runs the reference model on the batch (TRL's default).
- ``trl_pre``: the same with ``precompute_ref_log_probs=True`` (no reference model kept; the reference
  pass runs once in ``DPOTrainer.__init__``, timed separately).

Both sides see the same episodes (the ones ``train`` draws for each step: ``_episodes_for_step``), in the
same order (TRL's sampler is set to sequential), so every step has the same 4 pairs on both sides. TRL gets
prompt = BOS + ``build_prompt(...)`` and the episode's responses as chosen/rejected (TRL appends EOS); the
subprocess asserts that TRL's tokenized prompt/chosen/rejected ids equal ``tokenize_episode``'s, so both
sides process exactly the same real tokens (``max_length=None``: no truncation). Same lr (constant, no
warm-up), AdamW (betas 0.9/0.95, no weight decay), grad clip 1.0, beta 0.01. Throughput is over the steps
after the warm-up ones, from step-end to step-end (ours: ``train``'s progress callback; TRL: a
``TrainerCallback.on_step_end``), so it excludes model loading, TRL's dataset tokenization and either
side's reference precompute. ``ours`` runs with ``average_logps=True`` (TRL's IPO length-normalisation);
FSPO's default (sum) costs the same.

Non-default TRL settings and why: ``gradient_checkpointing=False`` (DPOConfig defaults to True; ours does
not checkpoint), ``bf16=False`` (DPOConfig defaults to bf16; both sides float32), ``max_length=None``.

With ``--targets K`` (K > 1) a fourth peer, ``ours_targets``, runs the same stage with
``targets_per_episode=K``: each of the batch's users brings up to K held-out pairs behind one set of shots,
all scored in one packed row (``packed_group_logps``). Its pairs/s against ``ours`` is what sharing the
shots across targets buys (its steps hold up to K x batch pairs, drawn by ``train`` the same way).

``--model DIR`` starts every peer from that Hugging Face model directory instead of the tiny Llama
(same dataset; the shots/steps/batch defaults shrink to 2 and 4 shots, batch 2, 1 warm-up + 3 timed
steps, sized for a 2-core CPU). ``--lora`` trains a LoRA adapter on both sides: ours is
``TrainConfig(lora=True, lora_r=16, lora_alpha=32)`` (peft's ``all-linear``, dropout 0, the reference
log-probs precomputed from the adapter-free initial model as always); TRL gets
``peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)`` and no
``ref_model``, so its reference is the same model with the adapter disabled (``trl``: a reference forward
in every step; ``trl_pre``: once in ``__init__``). The prompt's BOS follows ``modeling.llm.document_bos_id``,
as ``tokenize_episode`` does: SmolLM2's BOS ``<|im_start|>`` is a chat-turn marker, so neither side puts
it before the plain FSPO prompt (the tiny tokenizer's BOS is a document start and is kept).

About 4 minutes on a quiet 2-core machine. With another job loading the cores, 2-thread steps slow down 3-5x
and unevenly, and the ratios are not meaningful; the per-step times are printed to stderr to show it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

USERS, PAIRS_PER_USER = 600, 12
THREADS = 2
LR = 1e-4
BETA = 0.01
LORA_R, LORA_ALPHA = 16, 32
KINDS = ("ours", "trl", "trl_pre")
# Where and how both sides train: float32 on the CPU, no checkpointing, here; bench/bench_gpu.py sets a
# GPU profile (bfloat16, gradient checkpointing, 8k prompts) with ``use_profile`` before ``one``.
PROFILE: dict[str, Any] = {"dtype": "float32", "gradient_checkpointing": False, "max_prompt_tokens": 4096}


def use_profile(**settings: Any) -> None:
    """Train both sides with these ``PROFILE`` settings (and on the GPU when the dtype is bfloat16)."""
    unknown = set(settings) - set(PROFILE)
    assert not unknown, unknown
    PROFILE.update(settings)


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def _env() -> None:
    for k, v in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "WANDB_DISABLED": "true",
    }.items():
        os.environ.setdefault(k, v)


def prepare(work: Path, *, tiny: bool) -> None:
    """The dataset under ``work``, and with ``tiny`` the init checkpoint (model + tokenizer) too."""
    from modeling.data import EpisodeSource
    from modeling.synth import generate_dataset
    from modeling.train import TrainConfig, build_tiny_model

    generate_dataset(out_dir=work / "ds", domain="elix", users=USERS, pairs_per_user=PAIRS_PER_USER, seed=0)
    if not tiny:
        return
    cfg = TrainConfig(dataset=str(work / "ds"), out_dir=str(work / "init"), stage="pretrain", seed=0)
    model, tok = build_tiny_model(EpisodeSource(work / "ds", split="train"), work / "init", cfg)
    model.save_pretrained(work / "init", safe_serialization=True)
    tok.save_pretrained(work / "init")
    shutil.rmtree(work / "init" / "tokenizer", ignore_errors=True)


def lora_config():
    """TRL's adapter: what ``train`` builds for ``TrainConfig(lora=True)``."""
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
    )


def train_config(work: Path, init: Path, lora: bool, shots: int, steps: int, batch: int, out: str):
    from modeling.train import TrainConfig

    return TrainConfig(
        dataset=str(work / "ds"),
        out_dir=str(work / out),
        init=str(init),
        stage="ipo",
        lora=lora,
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        shots=(shots, shots),
        steps=steps,
        batch_size=batch,
        lr=LR,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.0,
        grad_clip=1.0,
        beta=BETA,
        average_logps=True,
        eval_every=steps,  # evaluate only at step 0 and after the last step (both outside the timed window)
        eval_episodes=1,  # one held-out pair: the two evaluations (untimed) cost little on a real model
        save_every=steps + 1,  # no intermediate checkpoint inside the loop
        seed=0,
        dtype=PROFILE["dtype"],
        gradient_checkpointing=PROFILE["gradient_checkpointing"],
        max_prompt_tokens=PROFILE["max_prompt_tokens"],
    )


def run_ours(
    work: Path, init: Path, lora: bool, shots: int, steps: int, warmup: int, batch: int, targets: int = 1
) -> dict:
    import dataclasses

    import torch

    import modeling.train as T
    from modeling.train import objectives, setup

    cfg = train_config(work, init, lora, shots, steps, batch, f"ours-{shots}-{targets}")
    cfg = dataclasses.replace(cfg, targets_per_episode=targets)
    ref_seconds: list[float] = []
    processed: list[int] = []
    # Wrapped where train looks them up: setup_run calls _reference_logps, _pref_loss calls _pair_logps.
    orig_ref, orig_pair = setup._reference_logps, objectives._pair_logps

    def timed_ref(*a, **k):
        t = time.perf_counter()
        out = orig_ref(*a, **k)
        ref_seconds.append(time.perf_counter() - t)
        return out

    def counted_pair(*a, **k):
        out = orig_pair(*a, **k)
        if torch.is_grad_enabled():  # training steps only (reference and eval passes run under no_grad)
            processed.append(out[2])
        return out

    setup._reference_logps, objectives._pair_logps = timed_ref, counted_pair
    step_end: dict[int, float] = {}

    def progress(done: int, total: int, msg: str) -> None:
        if msg.startswith(cfg.stage):
            step_end[done] = time.perf_counter()

    t0 = time.perf_counter()
    T.train(cfg, progress=progress)
    wall = time.perf_counter() - t0

    pair_tokens = _pair_tokens(cfg, init)
    assert len(processed) == steps, processed
    return {
        "timed_seconds": step_end[steps] - step_end[warmup],
        "step_seconds": [step_end[s + 1] - step_end[s] for s in range(warmup, steps)],
        # first call: the training batches; second: the eval batch
        "ref_precompute_seconds": ref_seconds[0],
        "pair_tokens": pair_tokens,
        "processed_tokens": processed,
        "wall_seconds": wall,
    }


def _pair_tokens(cfg: Any, init: Path) -> list[list[int]]:
    """The real tokens of the pairs each step trained on (recomputed after the run, with train's own
    functions)."""
    from transformers import AutoTokenizer

    import modeling.train as T
    from modeling.data import EpisodeSource

    tok = AutoTokenizer.from_pretrained(init)
    src = EpisodeSource(cfg.dataset, split="train")
    return [
        [len(e.prompt) + len(e.chosen) + len(e.rejected) for e in T._examples(src, tok, cfg, s)]
        for s in range(cfg.steps)
    ]


def run_trl(
    work: Path, init: Path, lora: bool, shots: int, steps: int, warmup: int, batch: int, precompute: bool
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    cfg = train_config(work, init, lora, shots, steps, batch, "unused")
    tok = AutoTokenizer.from_pretrained(init)
    dataset, ours = _trl_dataset(cfg, tok, steps)

    def load():
        import torch

        return AutoModelForCausalLM.from_pretrained(init, dtype=getattr(torch, PROFILE["dtype"]))

    model = load()
    ref_model = None
    # LoRA: no ref_model; TRL scores the reference with the adapter disabled (peft_config wraps the model).
    if not precompute and not lora:
        ref_model = load()
        ref_model.eval().requires_grad_(False)
    args = _dpo_config(work, shots, steps, batch, precompute, lora)

    pre_seconds = _time_ref_precompute()
    t0 = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=lora_config() if lora else None,
    )
    init_seconds = time.perf_counter() - t0
    ds = trainer.train_dataset
    _assert_same_tokens(ds, ours)
    processed, step_end = _instrument(trainer)
    t1 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t1
    pair_tokens = [
        [
            len(ds[s * batch + j]["prompt_ids"])
            + len(ds[s * batch + j]["chosen_ids"])
            + len(ds[s * batch + j]["rejected_ids"])
            for j in range(batch)
        ]
        for s in range(steps)
    ]
    return {
        "timed_seconds": step_end[steps] - step_end[warmup],
        "step_seconds": [step_end[s + 1] - step_end[s] for s in range(warmup, steps)],
        "ref_precompute_seconds": pre_seconds[0] if pre_seconds else None,
        "init_seconds": init_seconds,  # dataset tokenization (+ the reference precompute with trl_pre)
        "pair_tokens": pair_tokens,
        "processed_tokens": processed[:steps],
        "wall_seconds": wall,
    }


def _time_ref_precompute() -> list[float]:
    """Time each of TRL's reference precomputes (``trl_pre``: once, in ``DPOTrainer.__init__``)."""
    from trl import DPOTrainer

    pre_seconds: list[float] = []
    orig_pre = DPOTrainer._precompute_ref_logps

    def timed_pre(self, *a, **k):
        t = time.perf_counter()
        out = orig_pre(self, *a, **k)
        pre_seconds.append(time.perf_counter() - t)
        return out

    DPOTrainer._precompute_ref_logps = timed_pre
    return pre_seconds


def _trl_dataset(cfg: Any, tok: Any, steps: int) -> tuple[Any, list[Any]]:
    """TRL's dataset of the episodes ``train`` draws for each step (prompt text with the document BOS,
    chosen, rejected), and ours tokenized by ``tokenize_episode``."""
    from datasets import Dataset

    import modeling.train as T
    from modeling.data import EpisodeSource
    from modeling.llm import document_bos_id

    src = EpisodeSource(cfg.dataset, split="train")
    episodes = [e for s in range(steps) for e in T._episodes_for_step(src, cfg, s)]
    texts = [T.episode_texts(e, cfg) for e in episodes]
    ours = [T.tokenize_episode(tok, e, cfg) for e in episodes]
    assert not any(ex.shots_cut for ex in ours)  # TRL runs untruncated (max_length=None): so must ours
    # tokenize_episode puts the document BOS before the prompt, if the tokenizer has one (the tiny model's;
    # not SmolLM2's <|im_start|>). Neither tokenizer adds it itself, so TRL gets it as text.
    bos = tok.bos_token if document_bos_id(tok) is not None else ""
    dataset = Dataset.from_dict(
        {
            "prompt": [bos + p for p, _, _ in texts],
            "chosen": [c for _, c, _ in texts],
            "rejected": [r for _, _, r in texts],
        }
    )
    return dataset, ours


def _dpo_config(work: Path, shots: int, steps: int, batch: int, precompute: bool, lora: bool) -> Any:
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(work / f"trl-{shots}-{int(precompute)}-{int(lora)}"),
        loss_type="ipo",
        beta=BETA,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_length=None,  # no truncation: the same tokens as ours
        precompute_ref_log_probs=precompute,
        # DPOConfig's default is True; ours checkpoints only in the GPU profile
        gradient_checkpointing=PROFILE["gradient_checkpointing"],
        bf16=PROFILE["dtype"] == "bfloat16",  # DPOConfig's default is bf16; the CPU profile is float32
        use_cpu=_on_cpu(),
        report_to=[],
        logging_steps=steps,  # one log, after the last step (outside the timed window)
        save_strategy="no",
        train_sampling_strategy="sequential",  # the same pairs in each step as ours
        disable_tqdm=True,
        seed=0,
    )


def _assert_same_tokens(ds: Any, ours: list[Any]) -> None:
    """TRL tokenized the same ids as ours, pair for pair (and dropped or truncated nothing)."""
    assert len(ds) == len(ours), (len(ds), len(ours))
    for i, ex in enumerate(ours):
        row = ds[i]
        assert row["prompt_ids"] == ex.prompt, f"pair {i}: prompt ids differ"
        assert row["chosen_ids"] == ex.chosen, f"pair {i}: chosen ids differ"
        assert row["rejected_ids"] == ex.rejected, f"pair {i}: rejected ids differ"


def _instrument(trainer: Any) -> tuple[list[int], dict[int, float]]:
    """Count the model input tokens of each collated batch, and time each step's end."""
    from transformers import TrainerCallback

    processed: list[int] = []
    collate = trainer.data_collator

    def counted_collate(examples):
        out = collate(examples)
        processed.append(int(out["input_ids"].numel()))
        return out

    trainer.data_collator = counted_collate
    step_end: dict[int, float] = {}

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            step_end[state.global_step] = time.perf_counter()

    trainer.add_callback(StepTimes())
    return processed, step_end


def one(
    kind: str,
    shots: int,
    work: Path,
    init: Path,
    lora: bool,
    steps: int,
    warmup: int,
    batch: int,
    targets: int,
) -> dict:
    _env()
    import torch

    if _on_cpu():
        torch.set_num_threads(THREADS)
    import datasets  # noqa: F401 - imports are not part of anything timed
    import transformers  # noqa: F401

    import modeling.train  # noqa: F401

    if not kind.startswith("ours"):
        import trl  # noqa: F401
    if lora:
        import peft  # noqa: F401
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "ours":
        res = run_ours(work, init, lora, shots, steps, warmup, batch)
    elif kind == "ours_targets":
        res = run_ours(work, init, lora, shots, steps, warmup, batch, targets)
    else:
        res = run_trl(work, init, lora, shots, steps, warmup, batch, precompute=kind == "trl_pre")
    timed = [t for s in res["pair_tokens"][warmup:] for t in s]
    res.update(
        kind=kind,
        shots=shots,
        pairs_per_s=len(timed) / res["timed_seconds"],
        pair_tokens_per_s=sum(timed) / res["timed_seconds"],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_after_imports_mb=base_rss / 1024,
        torch_threads=torch.get_num_threads(),
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    )
    return res


def _rate(x: float) -> str:
    """pairs/s with two decimals, or three significant digits below 1 (a real model on a CPU)."""
    return f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def main() -> int:
    args = _args()
    real = args.model is not None
    total = args.steps + args.warmup
    if args.prepare:
        _env()
        prepare(Path(args.prepare), tiny=not real)
        return 0
    if args.one:
        kind, shots, work = args.one
        init = Path(args.model).resolve() if real else Path(work) / "init"
        res = one(kind, int(shots), Path(work), init, args.lora, total, args.warmup, args.batch, args.targets)
        print(json.dumps(res))
        return 0
    results = _run_peers(args)
    model = Path(args.model).name if real else "tiny Llama (hidden 128, 4 layers)"
    lora = f", LoRA r {LORA_R} alpha {LORA_ALPHA} all-linear both sides (TRL: peft_config, no ref_model)"
    print(
        f"\nFSPO IPO training vs TRL DPOTrainer(loss_type='ipo'): {model}{lora if args.lora else ''}, "
        f"float32 CPU, {THREADS} threads, batch {args.batch}, {args.steps} timed steps after "
        f"{args.warmup} warm-up\n"
    )
    _throughput_table(args, results)
    _token_table(args, results)
    if args.targets > 1:
        _targets_table(args, results)
    return 0


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--shots", type=int, nargs="+", help="shot counts (default 4 8; with --model 2 4)")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default 12; with --model 3)")
    p.add_argument(
        "--warmup", type=int, help="untimed optimizer steps before them (default 2; with --model 1)"
    )
    p.add_argument("--batch", type=int, help="pairs per step (default 4; with --model 2)")
    p.add_argument(
        "--targets", type=int, default=1, help="K > 1: also ours with K held-out targets per episode"
    )
    p.add_argument("--model", help="a Hugging Face model directory to start from instead of the tiny Llama")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (r 16, alpha 32) on both sides")
    p.add_argument("--one", nargs=3, metavar=("KIND", "SHOTS", "WORK"), help=argparse.SUPPRESS)
    p.add_argument("--prepare", metavar="WORK", help=argparse.SUPPRESS)
    args = p.parse_args()
    real = args.model is not None
    for name, tiny_default, real_default in (
        ("shots", [4, 8], [2, 4]),
        ("steps", 12, 3),
        ("warmup", 2, 1),
        ("batch", 4, 2),
    ):
        if getattr(args, name) is None:
            setattr(args, name, real_default if real else tiny_default)
    if real and not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    return args


def _run_peers(args: argparse.Namespace) -> dict[tuple[str, int], dict]:
    """Every peer at every shot count, each in its own subprocess, on one prepared dataset (and init)."""
    real = args.model is not None
    _env()
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        t = time.perf_counter()
        # In a subprocess too: a child's ru_maxrss starts from its parent's peak RSS (Linux keeps it across
        # fork and exec), so this parent stays free of torch and of the model it would otherwise build.
        mode = (["--model", args.model] if real else []) + (["--lora"] if args.lora else [])
        subprocess.run([sys.executable, __file__, "--prepare", str(tmp), *mode], check=True)
        what = "dataset" if real else "dataset and init model"
        print(f"  prepared {what} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        results: dict[tuple[str, int], dict] = {}
        for shots in args.shots:
            for kind in KINDS + (("ours_targets",) if args.targets > 1 else ()):
                cmd = [sys.executable, __file__, "--one", kind, str(shots), str(tmp)]
                cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
                cmd += ["--targets", str(args.targets), *mode]
                env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / f"hf-datasets-{kind}-{shots}")}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.stderr.write(proc.stderr[-4000:])
                    raise SystemExit(f"{kind} at {shots} shots failed (exit {proc.returncode})")
                r = results[kind, shots] = json.loads(proc.stdout.strip().splitlines()[-1])
                extra = (
                    f", ref precompute {r['ref_precompute_seconds']:.1f} s"
                    if r["ref_precompute_seconds"]
                    else ""
                )
                print(
                    f"  {kind:8s} {shots} shots: {_rate(r['pairs_per_s']):>5s} pairs/s, "
                    f"{r['pair_tokens_per_s']:7,.0f} pair tokens/s, peak RSS {r['peak_rss_mb']:4.0f} MB{extra}; "
                    f"step s: {' '.join(f'{x:.2f}' for x in r['step_seconds'])}",
                    file=sys.stderr,
                )
            # Same pairs, same real tokens on every side.
            assert results["ours", shots]["pair_tokens"] == results["trl", shots]["pair_tokens"]
            assert results["ours", shots]["pair_tokens"] == results["trl_pre", shots]["pair_tokens"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _throughput_table(args: argparse.Namespace, results: dict[tuple[str, int], dict]) -> None:
    B, N, W = args.batch, args.steps, args.warmup
    print(
        "| shots | pair tokens/pair | ours pairs/s | TRL pairs/s | ours/TRL | TRL precomputed-ref pairs/s "
        "| ours/TRL-pre | ours pair tokens/s | TRL pair tokens/s | TRL-pre pair tokens/s "
        "| peak RSS ours / TRL / TRL-pre (MB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in args.shots:
        o, t, q = (results[k, s] for k in KINDS)
        per_pair = sum(sum(x) for x in o["pair_tokens"][W:]) / (N * B)
        print(
            f"| {s} | {per_pair:,.0f} | {_rate(o['pairs_per_s'])} | {_rate(t['pairs_per_s'])} | "
            f"{o['pairs_per_s'] / t['pairs_per_s']:.2f}x | {_rate(q['pairs_per_s'])} | "
            f"{o['pairs_per_s'] / q['pairs_per_s']:.2f}x | {o['pair_tokens_per_s']:,.0f} | "
            f"{t['pair_tokens_per_s']:,.0f} | {q['pair_tokens_per_s']:,.0f} | "
            f"{o['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} / {q['peak_rss_mb']:.0f} |"
        )


def _token_table(args: argparse.Namespace, results: dict[tuple[str, int], dict]) -> None:
    B, N, W = args.batch, args.steps, args.warmup
    print(
        "\n| shots | model input tokens/pair, ours (packed) | TRL (prompt twice) | ratio "
        "| ours/TRL, ours/TRL-pre by median step time | ours ref precompute (s) | TRL-pre ref precompute (s) "
        "| TRL init incl. tokenization (s) | RSS after imports ours / TRL (MB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in args.shots:
        o, t, q = (results[k, s] for k in KINDS)
        op = sum(o["processed_tokens"][W:]) / (N * B)
        tp = sum(t["processed_tokens"][W:]) / (N * B)
        assert t["processed_tokens"] == q["processed_tokens"]
        med = {k: statistics.median(results[k, s]["step_seconds"]) for k in KINDS}
        print(
            f"| {s} | {op:,.0f} | {tp:,.0f} | {tp / op:.2f}x | {med['trl'] / med['ours']:.2f}x, "
            f"{med['trl_pre'] / med['ours']:.2f}x | {o['ref_precompute_seconds']:.1f} | "
            f"{q['ref_precompute_seconds']:.1f} | {t['init_seconds']:.1f} | "
            f"{o['rss_after_imports_mb']:.0f} / {t['rss_after_imports_mb']:.0f} |"
        )
    print(
        f"\n(reference precompute covers all {N + W} training batches; model input tokens include padding: "
        "ours B x max(P+C+R) per batch, TRL 2B x max(P+max(C,R)))"
    )


def _targets_table(args: argparse.Namespace, results: dict[tuple[str, int], dict]) -> None:
    N, W = args.steps, args.warmup
    print(
        f"\n| shots | pairs per step, {args.targets} targets per episode | pairs/s, 1 target | "
        f"pairs/s, {args.targets} targets | ratio | ours_targets/TRL | peak RSS 1 / {args.targets} targets (MB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in args.shots:
        o, g, t = results["ours", s], results["ours_targets", s], results["trl", s]
        per_step = sum(len(x) for x in g["pair_tokens"][W:]) / N
        print(
            f"| {s} | {per_step:.1f} | {o['pairs_per_s']:.2f} | {g['pairs_per_s']:.2f} | "
            f"{g['pairs_per_s'] / o['pairs_per_s']:.2f}x | {g['pairs_per_s'] / t['pairs_per_s']:.2f}x | "
            f"{o['peak_rss_mb']:.0f} / {g['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
