"""``fspo train`` and ``fspo paper-table``: one training stage, and every arm of the paper's comparison."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .evaluate import _print_eval
from .flags import config_flags, given_fields
from .ui import console, out, progress_bar


def train_parser() -> argparse.ArgumentParser:
    """``fspo train``'s flags: one per documented ``TrainConfig`` field (``config_flags``), then
    ``--config`` and ``--device``."""
    from ..train import TrainConfig

    p = argparse.ArgumentParser(
        prog="fspo train",
        description="One FSPO training stage (pretrain | sft | ipo | dpo). "
        "`fspo train memory --config FILE` estimates the memory per GPU a config needs.",
    )
    config_flags(p, TrainConfig)
    p.add_argument(
        "--config", type=Path, help="a JSON file of TrainConfig fields (flags given here override it)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when visible)")
    return p


def cmd_train(argv: list[str]) -> int:
    """One stage; under ``accelerate launch`` or ``torchrun`` every process runs this, and only the main
    one shows the progress bar and prints. ``fspo train memory`` estimates a config's memory instead."""
    from ..train import TrainConfig, train
    from ..train.distributed import is_main_process

    if argv[:1] == ["memory"]:
        return cmd_train_memory(argv[1:])
    args = train_parser().parse_args(argv)
    fields = json.loads(args.config.read_text()) if args.config else {}
    cfg = TrainConfig(**{**fields, **given_fields(args, TrainConfig)})
    if not is_main_process():
        train(cfg, device=args.device)
        return 0
    with progress_bar(f"train {cfg.stage}") as update:
        result = train(cfg, progress=update, device=args.device)
    final = result.metrics["final"]
    out.print(
        f"wrote {result.out_dir}: {cfg.stage}, held-out loss {result.metrics['history'][0]['eval_loss']:.4f} → "
        f"{final['eval_loss']:.4f}"
        + (
            f", held-out preference accuracy {final['eval_pref_accuracy']:.3f}"
            if "eval_pref_accuracy" in final
            else ""
        )
    )
    if result.metrics.get("shots_cut"):
        out.print(
            f"{result.metrics['prompts_cut']:,} training prompts were over {result.metrics['prompt_limit']:,} "
            f"tokens and dropped {result.metrics['shots_cut']:,} of their earliest shots"
        )
    return 0


def cmd_train_memory(argv: list[str]) -> int:
    """``fspo train memory``: the memory per GPU a training config needs (``modeling.train.memory``),
    for one process and for data-parallel and sharded runs over N."""
    from transformers import AutoConfig

    from ..train import TrainConfig
    from ..train.memory import Shape, memory_table

    p = argparse.ArgumentParser(
        prog="fspo train memory",
        description="The memory per GPU a training config needs: weights, gradients, optimizer state, "
        "activations and logits, on 1 GPU and data parallel (DDP) or sharded (FSDP) over N.",
    )
    p.add_argument("--config", type=Path, required=True, help="a JSON file of TrainConfig fields")
    p.add_argument(
        "--model-config",
        type=Path,
        default=None,
        help="the model's Hugging Face config.json (default: the one in the config's init)",
    )
    p.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[2, 4],
        metavar="N",
        help="GPUs to split over (each a divisor of batch_size)",
    )
    args = p.parse_args(argv)
    fields = json.loads(args.config.read_text())
    cfg = TrainConfig(**{"dataset": "-", "out_dir": "-", **fields})  # only the shape of the run is read
    model_config = args.model_config or (Path(cfg.init) / "config.json" if cfg.init else None)
    if model_config is None or not model_config.is_file():
        raise SystemExit(f"fspo train memory: no model config at {model_config}; give --model-config")
    shape = Shape.of(AutoConfig.from_pretrained(model_config))
    layouts = [(1, False)] + [(n, sharded) for n in args.processes if n > 1 for sharded in (False, True)]
    rows = memory_table(cfg, shape, layouts)
    kind = f"LoRA r{cfg.lora_r}" if cfg.lora else "full"
    out.print(
        f"{args.config.name}: {cfg.stage}, {kind}, {shape.params / 1e9:.2f}B params, {cfg.dtype}, "
        f"batch {cfg.batch_size}, {cfg.max_prompt_tokens:,}-token prompts (+ {cfg.max_target_tokens}-token "
        f"responses), {cfg.optimizer}; GiB per GPU (the config has gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'})",
        markup=False,
    )
    out.print("| layout | " + " | ".join(list(rows[0])[1:]) + " |", markup=False)
    out.print("| --- " * len(rows[0]) + "|", markup=False)
    for row in rows:
        cells = [row["layout"], *(f"{v:.1f}" for k, v in row.items() if k != "layout")]
        out.print("| " + " | ".join(cells) + " |", markup=False)
    return 0


def cmd_paper_table(argv: list[str]) -> int:
    from ..pipeline import PipelineConfig, config_from_json, run_pipeline

    p = argparse.ArgumentParser(
        prog="fspo paper-table", description="Train every arm of the paper's comparison and evaluate them."
    )
    p.add_argument("--dataset", required=True, help="structured synthetic dataset")
    p.add_argument(
        "--random-dataset", default=None, help="the unstructured ablation dataset (fspo synth --mode random)"
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--config", type=Path, help="JSON of PipelineConfig fields (step budgets, model size, ...)"
    )
    args = p.parse_args(argv)
    fields = {"dataset": args.dataset, "out_dir": args.out, "random_dataset": args.random_dataset}
    pc = config_from_json(args.config, **fields) if args.config else PipelineConfig(**fields)
    with progress_bar("paper table") as update:
        result = run_pipeline(pc, progress=update, log=console.print)
    _print_eval(result)
    return 0
