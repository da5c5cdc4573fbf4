"""``./run demo``: the platform's main job on the embedded defaults.

1. The synthetic engine: a small procedural dataset for each domain, plus the unstructured ablation of
   one; their sizes, self-consistency and diversity side by side.
2. FSPO on the procedural ELIX world: a tiny decoder is pretrained from scratch (the base model), then
   meta-trained with Pref-FT and IPO (FSPO), beside the aggregate IPO baseline; every arm answers held-out
   users' held-out questions and the exact oracle judges each against the base. Prints the comparison
   table and the shot-count sweep; the report, plots and generations are in the run folder.
3. The study platform on the embedded defaults (``manage.py demo_site``, in another process: modeling
   never imports Django): SQLite, the serverless Celery broker and a worker, the in-memory channel layer,
   and a study whose FSPO arm is the model of step 2 (the base model with no user context is its
   baseline). It prints the coordinator's login and a participant link and serves until Ctrl-C;
   ``--check`` instead walks one scripted participant through the study over HTTP and stops.

Trained stages are kept: a second run skips them and only evaluates (``--retrain`` starts over). The
site's database (under ``<out>/site/``) is kept too: a rerun reuses its study and coordinator account.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from .cli import console, out, progress_bar, quiet_library_progress_bars, stats_table
from .synth import BUILTIN_DOMAINS, generate_dataset
from .synth.stats import dataset_stats


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.no_embeddings = args.no_embeddings or args.check
    quiet_library_progress_bars()

    t0 = time.perf_counter()
    synthesize(
        args.out, users=args.users, pairs_per_user=args.pairs_per_user, embeddings=not args.no_embeddings
    )
    if args.no_train:
        out.print(f"done in {time.perf_counter() - t0:.1f} s")
        return 0
    base_model = None
    if args.model == "smollm2":
        from .models import pull

        with progress_bar("SmolLM2-135M-Instruct") as update:
            base_model = pull("smollm2-135m", progress=update)
        out.print(f"base model: {base_model}")
    run_dir = args.out / RUN_DIRS[args.model]
    train_and_evaluate(args.out / "elix", run_dir, retrain=args.retrain, base_model=base_model)
    out.print(f"steps 1-2 done in {time.perf_counter() - t0:.1f} s")
    if args.no_site:
        return 0
    status = start_site(args.out, check=args.check, port=args.port, run=run_dir, base_model=base_model)
    if args.check:
        out.print(f"done in {time.perf_counter() - t0:.1f} s")
    return status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="./run demo")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--pairs-per-user", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("var/demo"))
    p.add_argument("--no-embeddings", action="store_true")
    p.add_argument("--no-train", action="store_true", help="only the synthetic data step")
    p.add_argument("--retrain", action="store_true", help="train every stage again")
    p.add_argument("--no-site", action="store_true", help="stop after training (do not start the platform)")
    p.add_argument(
        "--check",
        action="store_true",
        help="walk one scripted participant through the platform, then stop (implies --no-embeddings)",
    )
    p.add_argument("--port", type=int, default=8000, help="the platform's port (0: any free port)")
    p.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: a decoder pretrained from scratch on the ELIX world (the default); smollm2: LoRA FSPO on "
        "the real SmolLM2-135M-Instruct (fspo models pull smollm2-135m), so participants read real English",
    )
    return p


def synthesize(out_dir: Path, *, users: int, pairs_per_user: int, embeddings: bool) -> None:
    """Step 1: a procedural dataset per domain and the unstructured ablation of one (under ``out_dir``),
    with their sizes, self-consistency and diversity side by side."""
    runs = [(d, "structured") for d in BUILTIN_DOMAINS] + [("roleplay", "random")]
    paths = []
    for domain, mode in runs:
        path = out_dir / (domain if mode == "structured" else f"{domain}-random")
        with progress_bar(f"{domain} ({mode})") as update:
            generate_dataset(
                out_dir=path,
                domain=domain,
                users=users,
                pairs_per_user=pairs_per_user,
                seed=0,
                mode=mode,
                overwrite=True,
                progress=update,
            )
        paths.append(path)
    console.print("measuring diversity (MiniLM embeddings) ..." if embeddings else "")
    stats = [dataset_stats(path, embeddings=embeddings) for path in paths]
    out.print(
        stats_table(
            stats,
            title=f"Synthetic preference data ({users:,} users x {pairs_per_user} pairs per domain)",
        )
    )
    out.print(f"datasets under {out_dir}/ ; inspect one with: ./run fspo synth stats {paths[0]}")


# The demo: the tiny world's recipe (PipelineConfig's defaults: base 1,500 steps, Pref-FT 100, IPO 900, the
# ptx term in both), 30 minutes of training and evaluation on two CPU cores, for the arms FSPO is
# compared with first.
DEMO_PIPELINE: dict[str, Any] = {
    "only": ("base", "ipo-aggregate", "pref-ft", "fspo"),
    "shots": (1, 4),
    "batch_size": 8,
    "eval_episodes": 200,
    "eval_shots": 4,
    "shot_sweep": (0, 1, 2, 4),
}


# The real-model demo: LoRA adapters on SmolLM2-135M-Instruct, sized for two CPU cores (docs/results.md
# has what this budget buys): 1-2 shots (prompts of ~170-370 tokens), 30 Pref-FT and 12 IPO steps of 4
# episodes, responses cut at 96 tokens. A step of 4 such episodes is ~1,600 tokens through a 135M model
# and back: about a minute on two CPU cores (docs/results.md), so this is a demonstration of the loop on
# a real model, not a recipe that personalizes it; a GPU runs the paper's budgets. No ptx and no frozen embeddings: those hold the tiny world's
# from-scratch base together; a pretrained model under LoRA keeps its weights.
SMOLLM2_PIPELINE: dict[str, Any] = {
    "only": ("pref-ft", "fspo"),
    "lora": True,
    "shots": (1, 2),
    "batch_size": 4,
    "steps": {"pretrain": 1, "sft": 30, "ipo": 12},
    "lr": {"pretrain": 1e-3, "sft": 2e-4, "ipo": 5e-5},
    "beta": 0.1,
    "ptx": {},
    "freeze_embeddings": False,
    "shot_targets": False,
    "max_target_tokens": 96,
    "eval_episodes": 24,
    "eval_shots": 2,
    "shot_sweep": (),
    "max_new_tokens": 64,
}
RUN_DIRS = {"tiny": "fspo-elix", "smollm2": "fspo-elix-smollm2"}


def train_and_evaluate(
    dataset: Path, run_dir: Path, *, retrain: bool = False, base_model: Path | None = None
) -> None:
    from .cli import _print_eval
    from .pipeline import PipelineConfig, run_pipeline

    if retrain and run_dir.exists():
        shutil.rmtree(run_dir)
    if base_model is None:
        out.print(
            f"\nFSPO on {dataset}: pretrain a tiny base model, then Pref-FT and IPO (checkpoints in {run_dir}/)"
        )
        pc = PipelineConfig(dataset=str(dataset), out_dir=str(run_dir), **DEMO_PIPELINE)
    else:
        out.print(
            f"\nFSPO on {dataset} with {base_model.name}: LoRA Pref-FT, then LoRA IPO (checkpoints in {run_dir}/)"
        )
        pc = PipelineConfig(
            dataset=str(dataset), out_dir=str(run_dir), base_model=str(base_model), **SMOLLM2_PIPELINE
        )
    with progress_bar("FSPO") as update:
        result = run_pipeline(pc, progress=update, log=console.print)
    _print_eval(result)


REPO = Path(__file__).resolve().parent.parent


def start_site(
    out_dir: Path, *, check: bool, port: int, run: Path | None = None, base_model: Path | None = None
) -> int:
    """Step 3: ``manage.py demo_site`` on the embedded defaults, with the database, the broker and the
    logs under ``<out_dir>/site/``; its exit status. Ctrl-C, SIGTERM and SIGHUP stop it: it then stops its
    server and worker, and this waits for it."""
    out_dir = out_dir.resolve()
    site = out_dir / "site"
    site.mkdir(parents=True, exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
    }
    env.update(
        DATABASE_URL=f"sqlite:///{site / 'db.sqlite3'}",
        CELERY_BROKER_URL=f"sqla+sqlite:///{site / 'celery-broker.sqlite'}",
        CELERY_RESULT_BACKEND=f"db+sqlite:///{site / 'celery-results.sqlite'}",
        STUDIO_DATA_DIR=str(out_dir),  # paths typed into the studio (e.g. elix, fspo-elix/fspo) resolve here
    )
    run = (run or out_dir / "fspo-elix").resolve()
    base = base_model.resolve() if base_model is not None else run / "base"
    argv = [sys.executable, str(REPO / "manage.py"), "demo_site", "--dataset", str(out_dir / "elix")]
    argv += ["--fspo", str(run / "fspo"), "--base", str(base), "--site-dir", str(site)]
    argv += ["--port", str(port), *(["--check"] if check else [])]
    if base_model is not None:
        # Its own study (a rerun of the tiny demo keeps its own), 2 picks as in training, shorter answers,
        # and the minutes a 135M model needs on two CPU cores to write them.
        argv += ["--slug", "elix-smollm2", "--picks", "2", "--max-new-tokens", "64", "--check-timeout", "900"]
    return _wait_passing_on_stops(subprocess.Popen(argv, cwd=REPO, env=env))


def _wait_passing_on_stops(site: subprocess.Popen[bytes]) -> int:
    """Wait for the site to exit; its exit status. Ctrl-C reaches the site itself (the terminal sends it
    to the whole foreground group). A SIGTERM (a process manager, `kill`) or SIGHUP (a closed terminal)
    reaches only this process, whose default would be to die at once, leaving the site, its server and
    its worker running: it is passed on as SIGTERM instead, and the site stops them before it exits."""

    def pass_on(signum: int, frame: FrameType | None) -> None:
        if site.poll() is None:
            site.send_signal(signal.SIGTERM)

    stops = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, pass_on) for sig in stops}
    try:
        while True:
            try:
                return site.wait()
            except KeyboardInterrupt:
                continue  # the site got the same Ctrl-C and is stopping its server and worker
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
