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
        prog="fspo train", description="One FSPO training stage (pretrain | sft | ipo | dpo)."
    )
    config_flags(p, TrainConfig)
    p.add_argument(
        "--config", type=Path, help="a JSON file of TrainConfig fields (flags given here override it)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when visible)")
    return p


def cmd_train(argv: list[str]) -> int:
    """One stage; under ``accelerate launch`` or ``torchrun`` every process runs this, and only the main
    one shows the progress bar and prints."""
    from ..train import TrainConfig, train
    from ..train.distributed import is_main_process

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
