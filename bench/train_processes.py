"""1 vs 2 CPU processes (data parallel and sharded) on the same IPO run (global batch 4): training pairs/s,
timed inside the loop.

    python bench/train_processes.py [--steps 24] [--workdir DIR]

Builds a procedural ELIX dataset and a tiny base (the demo's shape), then runs ``fspo train``'s IPO stage
in this process and under ``accelerate launch --config_file docs/configs/accelerate/cpu-2proc.yaml``
(DDP) and ``cpu-2proc-fsdp.yaml`` (FSDP2), each process half the cores' threads. The clock runs from the end of the loop's 4th step to its last,
read from the main process's progress callback (the processes step in lockstep), so start-up, the
reference precompute and evaluation are outside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WARM = 4


def timed_run(config: dict, out: Path) -> None:
    """Train ``config`` and, on the main process, write the loop's pairs/s to ``out/bench.json``."""
    from modeling.train import TrainConfig, train

    marks: dict[int, float] = {}

    def progress(done: int, total: int, stage: str) -> None:
        if not stage.startswith("reference"):
            marks[done] = time.perf_counter()

    cfg = TrainConfig(**{**config, "out_dir": str(out)})
    train(cfg, progress=progress)
    if marks:
        pairs = (cfg.steps - WARM) * cfg.batch_size
        rate = pairs / (marks[cfg.steps] - marks[WARM])
        (out / "bench.json").write_text(json.dumps({"pairs_per_s": rate}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # one of the launched processes
        job = json.loads(args.worker.read_text())
        timed_run(job["config"], Path(job["out"]))
        return
    from modeling.synth import generate_dataset
    from modeling.train import TrainConfig, train

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fspo-bench-processes-"))
    ds = work / "elix"
    if not ds.exists():
        generate_dataset(out_dir=ds, domain="elix", users=300, pairs_per_user=10, seed=0)
    base = work / "base"
    if not (base / "fspo.json").exists():
        train(TrainConfig(dataset=str(ds), out_dir=str(base), stage="pretrain", steps=2, eval_episodes=4))
    config = dict(dataset=str(ds), init=str(base), stage="ipo", shots=[4, 4], batch_size=4, steps=args.steps)
    config.update(eval_every=args.steps, save_every=10_000, eval_episodes=4)
    cores = os.cpu_count() or 2
    torch_threads = {"OMP_NUM_THREADS": str(cores)}
    for old in ("one", "two", "two-fsdp"):
        shutil.rmtree(work / old, ignore_errors=True)
    one = work / "one"
    subprocess.run(
        [sys.executable, __file__, "--worker", _job(work, config, one)],
        env={**os.environ, **torch_threads},
        check=True,
    )
    for name, launch_config in (("two", "cpu-2proc.yaml"), ("two-fsdp", "cpu-2proc-fsdp.yaml")):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        launch += [
            str(REPO / "docs/configs/accelerate" / launch_config),
            "--num_cpu_threads_per_process",
            str(max(1, cores // 2)),
        ]
        job = _job(work, config, work / name)
        subprocess.run([*launch, __file__, "--worker", job], check=True, cwd=REPO)
    r1, r2, r3 = (
        json.loads((work / n / "bench.json").read_text())["pairs_per_s"] for n in ("one", "two", "two-fsdp")
    )
    load = os.getloadavg()[0]
    print(f"IPO, tiny 128x4 model, 4 shots, global batch 4, {args.steps - WARM} timed steps, {cores} cores")
    print(f"1 process:          {r1:.2f} pairs/s")
    print(f"2 processes (DDP):  {r2:.2f} pairs/s ({r2 / r1:.2f}x)")
    print(f"2 processes (FSDP): {r3:.2f} pairs/s ({r3 / r1:.2f}x); load average {load:.2f}")


def _job(work: Path, config: dict, out: Path) -> str:
    path = work / f"{out.name}.json"
    path.write_text(json.dumps({"config": config, "out": str(out)}))
    return str(path)


if __name__ == "__main__":
    main()
