"""Synthetic data engine throughput and peak memory, against a naive row-by-row writer, same run.

    ./run bench synth                    # 10k, 100k, 1M pairs (ELIX, 20 pairs per user)
    ./run bench synth --sizes 10000 100000

Each measurement runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own.
The naive peer does the same work the way a first script would: per user and per pair in Python,
rendering both responses for every row, labeling with the scalar rule, writing JSON lines one by one.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS_PER_USER = 20
DOMAIN = "elix"


def run_fast(pairs: int, out: Path) -> None:
    from modeling.synth import generate_dataset

    generate_dataset(
        out_dir=out, domain=DOMAIN, users=pairs // PAIRS_PER_USER, pairs_per_user=PAIRS_PER_USER, seed=0
    )


def run_naive(pairs: int, out: Path) -> None:
    import numpy as np

    from modeling.synth import load_domain, world

    dom = load_domain(DOMAIN)
    cfg = world.JudgeConfig()
    rng = np.random.default_rng(0)
    rnd = random.Random(0)
    qs = world.build_questions(dom, rng, None, 0.1)
    out.mkdir(parents=True)
    T = len(dom.traits)
    with open(out / "preferences.jsonl", "w") as f:
        for uid in range(pairs // PAIRS_PER_USER):
            u = world.sample_users(dom, rng, 1, uid)
            pref, weight, stated = u.pref[0].tolist(), u.weight[0].tolist(), u.stated[0].tolist()
            cands = []
            for _ in range(PAIRS_PER_USER * 3):
                q = rnd.randrange(len(qs.text))
                va = [rnd.randrange(k) for k in dom.trait_sizes]
                vb = [rnd.randrange(k) for k in dom.trait_sizes]
                cands.append((q, va, vb))
            for _round in range(4):
                labels = [
                    world.label_pair(dom, pref, weight, stated, va, vb, (rnd.random(), rnd.random()), cfg)
                    for _, va, vb in cands
                ]
                votes = [0] * T
                for (_, va, vb), (_, ok) in zip(cands, labels, strict=True):
                    if not ok:
                        for t in range(T):
                            votes[t] += va[t] != vb[t] and not stated[t]
                if max(votes) == 0:
                    break
                stated[votes.index(max(votes))] = True
            kept = 0
            for (q, va, vb), (a_wins, ok) in zip(cands, labels, strict=True):
                if not ok or va == vb or kept == PAIRS_PER_USER:
                    continue
                kept += 1
                topic = qs.topic[q]
                ta, tb = (
                    world.render_response(dom, topic, va, rnd),
                    world.render_response(dom, topic, vb, rnd),
                )
                chosen, rejected = (ta, tb) if a_wins else (tb, ta)
                f.write(
                    json.dumps(
                        {"user_id": uid, "question": qs.text[q], "chosen": chosen, "rejected": rejected}
                    )
                    + "\n"
                )


def one(kind: str, pairs: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    try:
        import numpy  # noqa: F401

        import modeling.synth  # noqa: F401 - imports are not part of the timing

        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        (run_fast if kind == "fast" else run_naive)(pairs, tmp / "out")
        dt = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (tmp / "out").iterdir())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "kind": kind,
            "pairs": pairs,
            "seconds": dt,
            "pairs_per_s": pairs / dt,
            "peak_rss_mb": peak / 1024,
            "rss_after_imports_mb": base_rss / 1024,
            "bytes_on_disk": size,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--one", nargs=2, metavar=("KIND", "PAIRS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return 0
    results = {}
    for n in args.sizes:
        for kind in ("fast", "naive"):
            proc = subprocess.run(
                [sys.executable, __file__, "--one", kind, str(n)], capture_output=True, text=True, check=True
            )
            results[kind, n] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[kind, n]
            print(
                f"  {kind:5s} {n:>9,} pairs: {r['seconds']:7.2f} s, {r['pairs_per_s']:>10,.0f} pairs/s, "
                f"peak RSS {r['peak_rss_mb']:6.0f} MB",
                file=sys.stderr,
            )
    print(f"\nSynthetic engine vs naive row-by-row writer ({DOMAIN}, {PAIRS_PER_USER} pairs/user)\n")
    print(
        "| pairs | engine pairs/s | naive pairs/s | speed-up | engine peak RSS (MB) | naive peak RSS (MB) | engine time (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        f, v = results["fast", n], results["naive", n]
        print(
            f"| {n:,} | {f['pairs_per_s']:,.0f} | {v['pairs_per_s']:,.0f} | {f['pairs_per_s'] / v['pairs_per_s']:.1f}x | "
            f"{f['peak_rss_mb']:.0f} | {v['peak_rss_mb']:.0f} | {f['seconds']:.2f} |"
        )
    base = results["fast", args.sizes[0]]["rss_after_imports_mb"]
    print(f"\n(RSS after imports, before work: {base:.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
