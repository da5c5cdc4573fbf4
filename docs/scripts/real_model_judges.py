"""How the judges see a real model's free text, on the answers an ``fspo eval`` run already generated.

    .venv/bin/python docs/scripts/real_model_judges.py --dataset var/demo/elix \
        --eval var/demo/fspo-elix-smollm2/eval --episodes 50 --shots 3 --arm FSPO --vs "base (no context)" \
        --judge-model ~/.cache/fspo/models/smollm2-135m

For every arm in ``generations.jsonl``: the fraction of answers the exact oracle can score (it reads the
ELIX level from lexical markers; an answer with no marker of any trait is "unscorable": the oracle then
scores it on topic and repetition alone), and the fraction that is off topic. Then the LLM judge
(``modeling.judges.LLMJudge`` on a local model, both orders, by the answers' probabilities) and the oracle
judge ``--arm`` against ``--vs`` on the same pairs: their agreement on the pairs both decide, and Cohen's
kappa (scikit-learn) over win/tie/loss. The episodes are rebuilt exactly as ``modeling.evaluate`` draws them
(held-out split, same seed), and checked against the generations' users and questions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=True)
    p.add_argument("--eval", required=True, help="an fspo eval output folder (generations.jsonl)")
    p.add_argument("--episodes", type=int, required=True)
    p.add_argument("--shots", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arm", required=True)
    p.add_argument("--vs", required=True)
    p.add_argument("--judge-model", required=True, help="a local HF model directory for the LLM judge")
    args = p.parse_args()

    from sklearn.metrics import cohen_kappa_score

    from modeling.data import EpisodeSource
    from modeling.judges import Comparison, LLMJudge, OracleJudge
    from modeling.llm import TransformersBackend
    from modeling.synth.world import detect_traits

    rows = [json.loads(line) for line in (Path(args.eval) / "generations.jsonl").open()]
    pool = EpisodeSource(args.dataset, split="test").sample(args.episodes, shots=args.shots, seed=args.seed)
    eps = [dataclasses.replace(e, shots=e.shots[: args.shots]) for e in pool]
    assert [(e.user_id, e.question) for e in eps] == [(r["user_id"], r["question"]) for r in rows]
    oracle = OracleJudge(args.dataset)
    arms = [k for k in rows[0] if k not in ("user_id", "question")]
    print("| arm | answers | oracle reads a trait | unscorable (no marker) | off topic |")
    print("|---|---:|---:|---:|---:|")
    for arm in arms:
        texts = [r[arm] for r in rows]
        detected = [detect_traits(oracle.domain, t) for t in texts]
        unscorable = sum(all(v is None for v in d) for d in detected)
        off = sum(e.meta.get("topic", "").lower() not in t.lower() for e, t in zip(eps, texts, strict=True))
        n = len(texts)
        print(f"| {arm} | {n} | {1 - unscorable / n:.1%} | {unscorable / n:.1%} | {off / n:.1%} |")

    comps = [
        Comparison(
            e.question,
            r[args.arm],
            r[args.vs],
            user_id=e.user_id,
            topic=e.meta.get("topic", ""),
            description=e.description,
        )
        for e, r in zip(eps, rows, strict=True)
    ]
    o = oracle.score(comps)
    judge = LLMJudge(TransformersBackend(args.judge_model, batch_size=4))
    j = judge.score(comps)
    both = [(a, b) for a, b in zip(o, j, strict=True) if a != 0.5 and b != 0.5]
    agree = sum(a == b for a, b in both)
    print(
        f"\n{args.arm} vs {args.vs}, {len(comps)} pairs: oracle win rate {sum(o) / len(o):.1%}, "
        f"LLM judge ({judge.name}) win rate {sum(j) / len(j):.1%}; both decide {len(both)} pairs and agree on "
        f"{agree} ({agree / max(1, len(both)):.1%}); the LLM judge ties {sum(b == 0.5 for b in j)}; "
        f"Cohen's kappa over win/tie/loss {cohen_kappa_score([str(x) for x in o], [str(x) for x in j]):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
