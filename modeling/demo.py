"""``./run demo``: the platform's main job on the embedded defaults.

For now (the synthetic engine): generate a small procedural dataset for each domain, plus the
unstructured ablation of one, and print their sizes, self-consistency and diversity side by side.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .cli import console, out, progress_bar, stats_table
from .synth import BUILTIN_DOMAINS, generate_dataset
from .synth.stats import dataset_stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run demo")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--pairs-per-user", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("var/demo"))
    p.add_argument("--no-embeddings", action="store_true")
    args = p.parse_args(argv)

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
    out.print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
