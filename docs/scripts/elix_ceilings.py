"""What reading the shots perfectly could score in the ELIX world (docs/results.md, "Ceilings").

For each held-out user of a dataset written by ``./run demo`` (or ``fspo synth --domain elix``), a policy
picks an explanation level; its answer is one of the dataset's own responses to the user's held-out
question at that level, and the oracle judges it against a response at a random level (what a base model
with no user context writes). Five draws per user. With a dataset made with a structure mix
(``SynthConfig.structures``), the table has a row per preference structure and shot count, and the Bayes
policy's posterior runs over every structure's users (the mix as the prior). Usage:

    .venv/bin/python docs/scripts/elix_ceilings.py [var/demo/elix] [--shots 1 2 4 8]

Policies: own = the user's own best level for the question (the oracle persona); Bayes = the level with
the highest posterior probability of beating a random level, given the shots (the exact likelihood of the
engine's labels: the user's flip, the judge's noise, ties by position, kept when both orders agree).
"""

from __future__ import annotations

import argparse
import itertools
import random
from dataclasses import dataclass

import numpy as np
import pandas as pd

from modeling.synth import load_dataset, load_domain
from modeling.synth.world import STRUCTURES, UserPreference, question_kind, user_preferences

FLIPS = (0.1, 0.15, 0.2, 0.25, 0.3)  # the noisy users' flip rates the posterior considers (FLIP_RANGE)


@dataclass(frozen=True)
class Hypotheses:
    """Every user the engine can draw, as a liking table: like[h, kind, level], prior[h], flip[h]."""

    like: np.ndarray
    prior: np.ndarray
    flip: np.ndarray
    structure: list[str]


def hypotheses(levels: int, mix: dict[str, float]) -> Hypotheses:
    """Each structure's users (uniform over their peaks and flip rates) weighted by the mix."""
    W = 1.0 - np.abs(np.arange(levels)[:, None] - np.arange(levels)[None, :]) / (levels - 1)
    pairs = list(itertools.permutations(range(levels), 2))
    like, prior, flip, structure = [], [], [], []
    for name in STRUCTURES:
        if mix.get(name, 0) <= 0:
            continue
        if name in ("weighted", "noisy"):  # one peak; [kind 0, kind 1] liking rows
            group = [
                (np.stack([W[p], W[p]]), f)
                for p in range(levels)
                for f in (FLIPS if name == "noisy" else (0.0,))
            ]
        elif name == "topical":
            group = [(np.stack([W[p], W[s]]), 0.0) for p, s in pairs]
        else:  # bimodal: two peaks at least two levels apart
            group = [(np.stack([np.maximum(W[p], W[s])] * 2), 0.0) for p, s in pairs if abs(p - s) >= 2]
        like += [lk for lk, _ in group]
        flip += [f for _, f in group]
        prior += [mix[name] / sum(mix.values()) / len(group)] * len(group)
        structure += [name] * len(group)
    return Hypotheses(
        like=np.stack(like), prior=np.asarray(prior), flip=np.asarray(flip), structure=structure
    )


def shot_likelihood(
    h: Hypotheses, kind: int, chosen: int, rejected: int, noise: float, bias: float
) -> np.ndarray:
    """P(the engine keeps this pair with this label | each hypothesis): the user flips the pair with
    its rate, the judge errs with ``noise`` in each order, a tie is labeled by position (kept with
    either label with probability bias * (1 - bias))."""
    m = h.like[:, kind, chosen] - h.like[:, kind, rejected]

    def g(x: np.ndarray) -> np.ndarray:
        return np.where(np.abs(x) < 1e-9, bias * (1 - bias), np.where(x > 0, (1 - noise) ** 2, noise**2))

    return (1 - h.flip) * g(m) + h.flip * g(-m)


def bayes_level(h: Hypotheses, post: np.ndarray, kind: int) -> int:
    """The level most likely to beat a uniformly random level (ties count a half) under the posterior."""
    like = h.like[:, kind, :]  # [H, L]
    beats = (like[:, :, None] > like[:, None, :]) + 0.5 * (like[:, :, None] == like[:, None, :])
    return int((post @ beats.mean(axis=2)).argmax())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dataset", nargs="?", default="var/demo/elix")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
    args = p.parse_args()
    ds = load_dataset(args.dataset)
    dom = load_domain("elix")
    levels = [v.name for v in dom.traits[0].values]
    cfg = ds.manifest["config"]
    mix = cfg.get("structures") or {"weighted": 1.0}
    hyp = hypotheses(len(levels), mix)
    users = user_preferences(dom, ds.table("users").to_pandas().set_index("user_id"), stated_only=False)
    resp = ds.table("responses").to_pandas()
    prefs = ds.table("preferences").to_pandas()
    qs = ds.table("questions").to_pandas()
    kinds = [question_kind(dom, t) for t in qs.text]
    level = resp.trait_level.map(levels.index).to_numpy()
    answers: dict[tuple[int, int], list[int]] = {}
    for rid, qid, lv in zip(resp.response_id, resp.question_id, level, strict=True):
        answers.setdefault((int(qid), int(lv)), []).append(int(rid))
    judge = cfg["judge"]
    rows = []
    for n in args.shots:
        rows += run_shots(
            n, prefs[prefs.user_split == "test"], users, hyp, kinds, level, answers, qs, resp, judge
        )
    df = pd.DataFrame(rows)
    table = df.groupby(["structure", "shots"]).mean()
    users_per = df.groupby(["structure", "shots"]).size() // 5
    print("| structure | shots | users | " + " | ".join(table.columns) + " |")
    print("|---|---:|---:|" + "---:|" * len(table.columns))
    for (structure, n), row in table.iterrows():
        cells = " | ".join(f"{100 * v:.1f}%" for v in row)
        print(f"| {structure} | {n} | {users_per[(structure, n)]} | {cells} |")


def run_shots(n, held_out, users, hyp, kinds, level, answers, qs, resp, judge) -> list[dict]:  # type: ignore[no-untyped-def]
    """One row per (user, draw) with each policy's win (1, 0.5 or 0) against a random-level answer."""
    dom = load_domain("elix")
    rng, rnd = np.random.default_rng(0), random.Random(0)
    L = hyp.like.shape[2]
    rows = []
    for uid, g in held_out.groupby("user_id"):
        shots, targets = g[g.question_split == "train"], g[g.question_split == "test"]
        if targets.empty or len(shots) < n:
            continue
        user: UserPreference = users[int(uid)]
        s = shots.sample(n, random_state=int(uid))
        post = hyp.prior.copy()
        for q, c, r in zip(s.question_id, s.chosen_id, s.rejected_id, strict=True):
            post *= shot_likelihood(hyp, kinds[q], level[c], level[r], judge["noise"], judge["position_bias"])
        post /= post.sum()
        qid = int(targets.iloc[0].question_id)
        kind, question, topic = kinds[qid], qs.text[qid], qs.topic[qid]
        first, second = user.peaks(kind)
        own = [max(1 - abs(lv - first[0]) / (L - 1), 1 - abs(lv - second[0]) / (L - 1)) for lv in range(L)]

        def score(
            lv: int, qid: int = qid, user: UserPreference = user, question: str = question, topic: str = topic
        ) -> float:
            options = answers.get((qid, lv))  # a pool may lack a level: that draw is skipped (NaN)
            return user.score(dom, question, topic, resp.text[rnd.choice(options)]) if options else np.nan

        for _ in range(5):
            base = score(int(rng.integers(L)))
            picks = {
                "own": int(np.argmax(own)),
                "Bayes": bayes_level(hyp, post, kind),
                "always level 2": 2,
                "random": int(rng.integers(L)),
            }
            row: dict = {"structure": user.structure, "shots": n}
            for k, lv in picks.items():
                mine = score(lv)
                row[k] = (
                    np.nan if np.isnan(mine + base) else 1.0 if mine > base else 0.5 if mine == base else 0.0
                )
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
