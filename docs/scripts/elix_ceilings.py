"""What reading the shots perfectly could score in the ELIX world (docs/results.md, "Ceilings").

For each held-out user of a dataset written by ``./run demo`` (or ``fspo synth --domain elix``), a policy
picks an explanation level; its answer is one of the dataset's own responses to the user's held-out
question at that level, and the oracle judges it against a response at a random level (what a base model
with no user context writes). Five draws per user. Usage:

    .venv/bin/python docs/scripts/elix_ceilings.py [var/demo/elix] [--shots 1 2 4 8]
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import pandas as pd

from modeling.synth import load_domain
from modeling.synth.world import score_text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dataset", nargs="?", default="var/demo/elix")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
    args = p.parse_args()
    dom = load_domain("elix")
    levels = [v.name for v in dom.traits[0].values]
    users = pd.read_parquet(f"{args.dataset}/users.parquet").set_index("user_id")
    resp = pd.read_parquet(f"{args.dataset}/responses.parquet")
    prefs = pd.read_parquet(f"{args.dataset}/preferences.parquet")
    topics = pd.read_parquet(f"{args.dataset}/questions.parquet").topic
    level = resp.trait_level.map(levels.index).to_numpy()
    answers: dict[tuple[int, int], list[int]] = {}
    for rid, qid, lv in zip(resp.response_id, resp.question_id, level, strict=True):
        answers.setdefault((int(qid), int(lv)), []).append(int(rid))
    held_out = prefs[prefs.user_split == "test"]
    rng, rnd = np.random.default_rng(0), random.Random(0)
    print(
        "shots | own level | Bayes mode of the shots | a random preferred shot's level | the preferred shots' majority | always level 2 | random"
    )
    for n in args.shots:
        wins: dict[str, list[float]] = {
            k: [] for k in ("own", "bayes", "copy", "majority", "middle", "random")
        }
        for uid, g in held_out.groupby("user_id"):
            shots, targets = g[g.question_split == "train"], g[g.question_split == "test"]
            if shots.empty or targets.empty:
                continue
            pref = levels.index(users.loc[uid, "pref_level"])
            s = shots.sample(min(n, len(shots)), random_state=int(uid))
            chosen, rejected = level[s.chosen_id.to_numpy()], level[s.rejected_id.to_numpy()]
            # Posterior over the user's level: the judge picks the closer level (2% noise); equidistant
            # pairs survive the order-swap check about a third of the time, with either label.
            post = np.ones(len(levels))
            for a, b in zip(chosen, rejected, strict=True):
                for lv in range(len(levels)):
                    da, db = abs(a - lv), abs(b - lv)
                    post[lv] *= 0.98 if da < db else 0.02 if da > db else 0.3
            qid = int(targets.iloc[0].question_id)

            def score(lv: int, qid: int = qid, pref: int = pref) -> float | None:
                options = answers.get((qid, lv))
                text = resp.text[rnd.choice(options)] if options else None
                return None if text is None else score_text(dom, [pref], [1.0], topics[qid], text)

            for _ in range(5):
                base = score(int(rng.integers(len(levels))))
                picks = {
                    "own": pref,
                    "bayes": int(post.argmax()),
                    "copy": int(rng.choice(chosen)),
                    "majority": int(np.bincount(chosen, minlength=len(levels)).argmax()),
                    "middle": 2,
                    "random": int(rng.integers(len(levels))),
                }
                for k, lv in picks.items():
                    mine = score(lv)
                    if mine is not None and base is not None:
                        wins[k].append(1.0 if mine > base else 0.5 if mine == base else 0.0)
        print(f"{n} | " + " | ".join(f"{100 * np.mean(v):.1f}%" for v in wins.values()))


if __name__ == "__main__":
    main()
