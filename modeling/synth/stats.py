"""Quality of a synthetic dataset: sizes, self-consistency and diversity (``fspo synth stats``).

Consistency figures are measured by the labeler while the dataset is made (it asks each pair in both
orders, asks again, and checks triples) and read from the manifest; diversity is measured here, on the
stored tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from .storage import load_dataset


def _entropy_normalized(values: list[str]) -> float:
    _, counts = np.unique(np.asarray(values, dtype=object), return_counts=True)
    if len(counts) < 2:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() / np.log2(len(counts)))


def _distinct_ngrams(texts: list[str], n: int = 2) -> float:
    """distinct-n: unique word n-grams / all word n-grams."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for t in texts:
        w = t.lower().split()
        grams = list(zip(*(w[i:] for i in range(n)), strict=False))
        seen.update(grams)
        total += len(grams)
    return len(seen) / max(total, 1)


def dataset_stats(
    path: str | Path, *, embeddings: bool = True, sample: int = 256, seed: int = 0
) -> dict[str, Any]:
    """Sizes, consistency and diversity of the dataset at ``path`` as a nested dict."""
    ds = load_dataset(path)
    rng = np.random.default_rng(seed)
    users = ds.table(
        "users",
        ["split", "description", "refinement_rounds", *[f"attr_{a}" for a in ds.manifest["attributes"]]],
    )
    questions = ds.table("questions", ["split", "text"])
    responses = ds.table("responses", ["text"])
    prefs = ds.table("preferences", ["user_split", "question_split", "margin"])
    quality = ds.manifest["quality"]

    def pick(texts: list[str]) -> list[str]:
        if len(texts) <= sample:
            return texts
        return [texts[i] for i in rng.choice(len(texts), size=sample, replace=False)]

    descriptions = users.column("description").to_pylist()
    q_texts = questions.column("text").to_pylist()
    r_texts = pick(responses.column("text").to_pylist())
    out: dict[str, Any] = {
        "dataset": str(ds.path),
        "domain": ds.domain,
        "mode": ds.manifest["mode"],
        "backend": ds.manifest.get("backend", "procedural"),
        "sizes": _sizes(ds.manifest["counts"], users, questions, prefs, r_texts),
        "consistency": _consistency(quality, users, prefs),
        "diversity": {
            "preference_combo_entropy_normalized": quality.get("preference_combo_entropy_normalized"),
            "preference_combos_seen": quality.get("preference_combos_seen"),
            "attribute_entropy_normalized": {
                a: round(_entropy_normalized(users.column(f"attr_{a}").to_pylist()), 4)
                for a in ds.manifest["attributes"]
            },
            "distinct_persona_texts": round(len(set(descriptions)) / max(len(descriptions), 1), 4),
            "response_distinct_2": round(_distinct_ngrams(r_texts), 4),
        },
    }
    if embeddings:
        from ..embed import embed, mean_pairwise_distance

        out["diversity"]["persona_embedding_distance"] = round(
            mean_pairwise_distance(embed(pick(descriptions))), 4
        )
        out["diversity"]["question_embedding_distance"] = round(
            mean_pairwise_distance(embed(pick(q_texts))), 4
        )
    return out


def _count(column: Any, value: str) -> int:
    return int(pc.sum(pc.equal(column, value)).as_py() or 0)


def _sizes(
    counts: dict[str, int], users: Any, questions: Any, prefs: Any, r_texts: list[str]
) -> dict[str, Any]:
    """The tables' row counts and the train/test splits (``r_texts``: the sampled responses)."""
    both_train = pc.and_(
        pc.equal(prefs.column("user_split"), "train"), pc.equal(prefs.column("question_split"), "train")
    )
    return {
        **counts,
        "users_train": _count(users.column("split"), "train"),
        "users_test": _count(users.column("split"), "test"),
        "questions_test": _count(questions.column("split"), "test"),
        "pairs_train_users_train_questions": int(pc.sum(both_train).as_py() or 0),
        "mean_response_words": round(float(np.mean([len(t.split()) for t in r_texts])), 1)
        if r_texts
        else 0.0,
    }


def _consistency(quality: dict[str, Any], users: Any, prefs: Any) -> dict[str, Any]:
    """The labeler's own consistency (from the manifest), and how often labels agree with the oracle."""
    margin = prefs.column("margin").to_numpy(zero_copy_only=False)
    decided = margin[np.isfinite(margin) & (margin != 0)]  # pairs the persona decides (NaN: LLM judge)
    return {
        "order_swap_agreement_initial": quality["order_swap_agreement_initial"],
        "order_swap_agreement_final": quality["order_swap_agreement_final"],
        "repeat_agreement": quality["repeat_agreement"],
        "transitivity_violation_rate": quality["transitivity_violation_rate"],
        "labels_agree_with_oracle": round(float((decided > 0).mean()), 4) if decided.size else None,
        "mean_refinement_rounds": round(float(np.mean(users.column("refinement_rounds").to_numpy())), 3),
        "stated_trait_fraction_initial": quality["stated_trait_fraction_initial"],
        "stated_trait_fraction_final": quality["stated_trait_fraction_final"],
    }


ROWS = [
    ("pairs", ("sizes", "preferences")),
    ("users (train/test)", None),
    ("questions (test)", None),
    ("responses", ("sizes", "responses")),
    ("order-swap agreement: initial → final", None),
    ("repeat agreement", ("consistency", "repeat_agreement")),
    ("transitivity violations", ("consistency", "transitivity_violation_rate")),
    ("labels agree with oracle", ("consistency", "labels_agree_with_oracle")),
    ("mean refinement rounds", ("consistency", "mean_refinement_rounds")),
    ("stated traits: initial → final", None),
    ("preference-combo entropy (norm.)", ("diversity", "preference_combo_entropy_normalized")),
    ("persona embedding distance", ("diversity", "persona_embedding_distance")),
    ("question embedding distance", ("diversity", "question_embedding_distance")),
    ("distinct persona texts", ("diversity", "distinct_persona_texts")),
    ("response distinct-2", ("diversity", "response_distinct_2")),
]


def stats_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows for one dataset's stats, for a table with one column per dataset."""
    c, z = s["consistency"], s["sizes"]
    special = {
        "users (train/test)": f"{z['users']:,} ({z['users_train']:,}/{z['users_test']:,})",
        "questions (test)": f"{z['questions']:,} ({z['questions_test']:,})",
        "order-swap agreement: initial → final": f"{c['order_swap_agreement_initial']:.3f} → {c['order_swap_agreement_final']:.3f}",
        "stated traits: initial → final": f"{c['stated_trait_fraction_initial']:.2f} → "
        + (
            "free text"
            if c["stated_trait_fraction_final"] is None
            else f"{c['stated_trait_fraction_final']:.2f}"
        ),
    }
    rows = []
    for label, key in ROWS:
        if key is None:
            rows.append((label, special[label]))
            continue
        v = s[key[0]].get(key[1])
        rows.append(
            (
                label,
                "—"
                if v is None
                else f"{v:,}"
                if isinstance(v, int)
                else f"{v:.3f}"
                if isinstance(v, float)
                else str(v),
            )
        )
    return rows
