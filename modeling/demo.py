"""``./run demo``: the platform's main job on the embedded defaults.

1. The synthetic engine: a small procedural dataset for each domain, plus the unstructured ablation of
   one; their sizes, self-consistency and diversity side by side.
2. FSPO on the procedural ELIX world: a tiny decoder is pretrained from scratch (the base model), then
   meta-trained with Pref-FT and IPO (FSPO), beside the aggregate IPO baseline; every arm answers held-out
   users' held-out questions and the exact oracle judges each against the base. Prints the comparison
   table and the shot-count sweep; the report, plots and generations are in the run folder.

Trained stages are kept: a second run skips them and only evaluates (``--retrain`` starts over).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from .cli import console, out, progress_bar, quiet_library_progress_bars, stats_table
from .synth import BUILTIN_DOMAINS, generate_dataset
from .synth.stats import dataset_stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run demo")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--pairs-per-user", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("var/demo"))
    p.add_argument("--no-embeddings", action="store_true")
    p.add_argument("--no-train", action="store_true", help="only the synthetic data step")
    p.add_argument("--retrain", action="store_true", help="train every stage again")
    args = p.parse_args(argv)
    quiet_library_progress_bars()

    t0 = time.perf_counter()
    runs = [(d, "structured") for d in BUILTIN_DOMAINS] + [("roleplay", "random")]
    paths = []
    for domain, mode in runs:
        path = args.out / (domain if mode == "structured" else f"{domain}-random")
        with progress_bar(f"{domain} ({mode})") as update:
            generate_dataset(
                out_dir=path,
                domain=domain,
                users=args.users,
                pairs_per_user=args.pairs_per_user,
                seed=0,
                mode=mode,
                overwrite=True,
                progress=update,
            )
        paths.append(path)
    console.print("measuring diversity (MiniLM embeddings) ..." if not args.no_embeddings else "")
    stats = [dataset_stats(path, embeddings=not args.no_embeddings) for path in paths]
    out.print(
        stats_table(
            stats,
            title=f"Synthetic preference data ({args.users:,} users x {args.pairs_per_user} pairs per domain)",
        )
    )
    out.print(f"datasets under {args.out}/ ; inspect one with: ./run fspo synth stats {paths[0]}")
    if not args.no_train:
        train_and_evaluate(args.out / "elix", args.out / "fspo-elix", retrain=args.retrain)
    out.print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


# The demo's budget: about five minutes of training on two CPU cores.
DEMO_PIPELINE: dict[str, Any] = {
    "only": ("base", "ipo-aggregate", "pref-ft", "fspo"),
    "shots": (1, 4),
    "batch_size": 8,
    "steps": {"pretrain": 300, "sft": 300, "ipo": 100},
    "eval_episodes": 100,
    "eval_shots": 4,
    "shot_sweep": (0, 1, 2, 4),
}


def train_and_evaluate(dataset: Path, run_dir: Path, *, retrain: bool = False) -> None:
    from .cli import _print_eval
    from .pipeline import PipelineConfig, run_pipeline

    if retrain and run_dir.exists():
        shutil.rmtree(run_dir)
    out.print(
        f"\nFSPO on {dataset}: pretrain a tiny base model, then Pref-FT and IPO (checkpoints in {run_dir}/)"
    )
    pc = PipelineConfig(dataset=str(dataset), out_dir=str(run_dir), **DEMO_PIPELINE)
    with progress_bar("FSPO") as update:
        result = run_pipeline(pc, progress=update, log=console.print)
    _print_eval(result)


if __name__ == "__main__":
    raise SystemExit(main())
