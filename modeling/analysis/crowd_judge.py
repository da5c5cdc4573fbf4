"""The project's own LLM judge (modeling.judges.LLMJudge, the judge `fspo eval --judge` uses) against the
crowd: on a seeded sample of the crowd's pairs, the judge's verdict (both orders, as always) against the
crowd's majority verdict, with the same kappa, agreement and bootstrap intervals as the GPT judges
(crowd.crowd_vs_judges). The crowd has no user description: the judge is shown "(no description)", so
it judges which response is better in general, which is what the crowd was asked."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..judges import Comparison, Judge
from ..synth.storage import load_dataset
from .crowd import RESAMPLES, SEED, CrowdData, JudgeAgreement, crowd_vs_judges

JUDGE_PAIRS = 100  # pairs the LLM judge is asked about by default (each in both orders)


def crowd_texts(path: str | Path) -> tuple[dict[int, str], dict[int, str]]:
    """(prompt id -> text, response id -> text) of an imported crowd dataset."""
    ds = load_dataset(path)
    questions = ds.table("questions", columns=["question_id", "text"]).to_pydict()
    responses = ds.table("responses", columns=["response_id", "text"]).to_pydict()
    return (
        dict(zip(questions["question_id"], questions["text"], strict=True)),
        dict(zip(responses["response_id"], responses["text"], strict=True)),
    )


def sample_pairs(data: CrowdData, *, pairs: int = JUDGE_PAIRS, seed: int = SEED) -> pd.DataFrame:
    """A seeded sample of `pairs` of the crowd's pairs (all of them if fewer): unit, question_id, lo, hi
    (the two response ids, lower first), in unit order."""
    units = data.judgments.drop_duplicates("unit").sort_values("unit")
    chosen = np.random.default_rng(seed).choice(len(units), size=min(pairs, len(units)), replace=False)
    rows = units.iloc[np.sort(chosen)]
    lo = np.minimum(rows["left_id"], rows["right_id"])
    hi = np.maximum(rows["left_id"], rows["right_id"])
    return pd.DataFrame(
        {"unit": rows["unit"].to_numpy(), "question_id": rows["question_id"].to_numpy(), "lo": lo, "hi": hi}
    ).reset_index(drop=True)


def llm_judge_rows(
    data: CrowdData,
    judge: Judge,
    *,
    questions: dict[int, str],
    responses: dict[int, str],
    pairs: int = JUDGE_PAIRS,
    seed: int = SEED,
) -> pd.DataFrame:
    """The judge's verdicts on a seeded sample of pairs, as rows of CrowdData.judges (judge, unit,
    left_id, right_id, label): the lower response id is shown first in the judge's first order."""
    sample = sample_pairs(data, pairs=pairs, seed=seed)
    comparisons = [
        Comparison(
            question=questions[int(q)], first=responses[int(lo)], second=responses[int(hi)], user_id="crowd"
        )
        for q, lo, hi in zip(sample["question_id"], sample["lo"], sample["hi"], strict=True)
    ]
    scores = judge.score(comparisons)
    # Sampled letters (a back end without probabilities) average to 0.25 or 0.75 too: the nearer label.
    labels = ["lo" if s > 0.5 else "hi" if s < 0.5 else "tie" for s in scores]
    return pd.DataFrame(
        {
            "judge": judge.name,
            "unit": sample["unit"],
            "left_id": sample["lo"],
            "right_id": sample["hi"],
            "label": labels,
        }
    )


def llm_judge_agreement(
    data: CrowdData, rows: pd.DataFrame, *, seed: int = SEED, resamples: int = RESAMPLES
) -> JudgeAgreement:
    """The LLM judge's rows (llm_judge_rows) against the crowd's majority on the same pairs: kappa,
    agreement and agreement where neither says tie, with percentile bootstrap intervals over pairs."""
    [result] = crowd_vs_judges(replace(data, judges=rows), seed=seed, resamples=resamples)
    return result
