"""Analyses of an imported crowd (`fspo analyze crowd`, the LLMFAO import of `fspo data import llmfao`):
how far real workers agree with each other and with themselves, how far the crowd agrees with the GPT
judges of the same pairs, and the models' Bradley-Terry ranking from the crowd beside the GPT-4 judge's.

Every judgment is coded by the response chosen, whatever side it was shown on: for a pair (a unit) of
responses with ids lo < hi, a judgment is "lo", "hi" or "tie". Ties are a third category (alpha and kappa
"with ties"), or left out (ties "dropped": the judgment counts as missing). The statistics come from
maintained libraries: Krippendorff's alpha from `krippendorff`, Cohen's kappa from scikit-learn, the
bootstrap and Spearman's rho from scipy, Bradley-Terry scores and their bootstrap from `evalica`.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import evalica
import krippendorff
import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import cohen_kappa_score

from ..synth.storage import DatasetError, load_dataset
from .data import AnalysisInputError

LABELS = ("lo", "hi", "tie")  # lo/hi: the response with the lower/higher id won
CODE = {label: i for i, label in enumerate(LABELS)}
MIN_SHARED = 10  # pairs two workers must both have judged for their Cohen's kappa to count
SEED = 0
RESAMPLES = 1000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class CrowdData:
    """The crowd's judgments (one row each: judgment, worker, unit, label, repeat_of), the judges'
    (judge, unit, label), and each response's model name, from an imported dataset."""

    judgments: pd.DataFrame
    judges: pd.DataFrame
    models: dict[int, str]  # response id -> model name
    manifest: dict[str, Any]
    lengths: dict[int, int] = field(default_factory=dict)  # response id -> characters


def _label(winner: pd.Series, left: pd.Series, right: pd.Series) -> pd.Series:
    chosen = np.where(winner == "left", left, right)
    return pd.Series(
        np.where(winner == "tie", "tie", np.where(chosen == np.minimum(left, right), "lo", "hi")),
        index=winner.index,
    )


def _units(frame: pd.DataFrame) -> pd.Series:
    lo = np.minimum(frame["left_id"], frame["right_id"])
    hi = np.maximum(frame["left_id"], frame["right_id"])
    return pd.Series([f"{a}-{b}" for a, b in zip(lo, hi, strict=True)], index=frame.index)


def load_crowd(path: str | Path) -> CrowdData:
    """An imported crowd dataset (backend ``imported:...``, with ``judges.parquet``); AnalysisInputError
    when it is not one."""
    try:
        ds = load_dataset(path)
    except DatasetError as e:
        raise AnalysisInputError(str(e)) from None
    if not str(ds.manifest.get("backend", "")).startswith("imported:"):
        raise AnalysisInputError(
            f"{path}: not an imported crowd (backend {ds.manifest.get('backend')!r}); "
            "make one with fspo data import llmfao"
        )
    if not (Path(path) / "judges.parquet").is_file():
        raise AnalysisInputError(f"{path}: missing judges.parquet")
    prefs = ds.table("preferences").to_pandas()
    judges = ds.table("judges").to_pandas()
    responses = ds.table("responses", columns=["response_id", "model_name", "text"]).to_pandas()
    for frame in (prefs, judges):
        frame["unit"] = _units(frame)
        frame["label"] = _label(frame["winner"], frame["left_id"], frame["right_id"])
    prefs = prefs.rename(columns={"user_id": "worker", "pair_id": "judgment"})
    return CrowdData(
        judgments=prefs[
            ["judgment", "worker", "question_id", "unit", "left_id", "right_id", "label", "repeat_of"]
        ],
        judges=judges[["judge", "unit", "left_id", "right_id", "label"]],
        models=dict(zip(responses["response_id"], responses["model_name"], strict=True)),
        manifest=ds.manifest,
        lengths=dict(zip(responses["response_id"], responses["text"].str.len(), strict=True)),
    )


def first_judgments(data: CrowdData) -> pd.DataFrame:
    """Each worker's first judgment of each pair (a repeat is for self-consistency only)."""
    return data.judgments[data.judgments["repeat_of"].isna()]


# --- agreement between workers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    units: int  # pairs judged by two or more workers
    workers: int
    judgments: int
    alpha_with_ties: float | None  # nominal, three categories
    alpha_ties_dropped: float | None  # ties as missing values
    observed_agreement: float | None  # share of agreeing pairs of judgments within a pair (ties a category)
    kappa_mean: float | None  # mean Cohen's kappa over worker pairs sharing >= min_shared pairs
    kappa_pairs: int
    kappa_ties_dropped_mean: float | None  # the same over shared decisive judgments
    kappa_ties_dropped_pairs: int
    kappa_undefined: int  # worker pairs with enough shared pairs whose kappa is undefined (no variation)
    min_shared: int


def krippendorff_nominal(frame: pd.DataFrame, *, drop_ties: bool = False) -> float | None:
    """Krippendorff's alpha (nominal) of `frame`'s (worker, unit, label) rows: raters x units, one value
    per cell; with `drop_ties`, a tie is a missing value. None when nothing can be paired or there is no
    variation."""
    rows = frame[frame["label"] != "tie"] if drop_ties else frame
    matrix = rows.assign(code=rows["label"].map(CODE)).pivot_table(
        index="worker", columns="unit", values="code", aggfunc="first"
    )
    values = matrix.to_numpy(dtype=float)
    paired = (~np.isnan(values)).sum(axis=0) >= 2
    if not paired.any() or len(np.unique(values[:, paired][~np.isnan(values[:, paired])])) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=values[:, paired], level_of_measurement="nominal"))


def _mean_kappa(answers: dict[Any, dict[str, str]], min_shared: int) -> tuple[list[float], int]:
    """Cohen's kappa of every pair of workers sharing at least `min_shared` units; (kappas, undefined)."""
    kappas, undefined = [], 0
    for x, y in itertools.combinations(sorted(answers), 2):
        common = sorted(answers[x].keys() & answers[y].keys())
        if len(common) < min_shared:
            continue
        a = [answers[x][u] for u in common]
        b = [answers[y][u] for u in common]
        if len(set(a) | set(b)) < 2:
            undefined += 1
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            k = cohen_kappa_score(a, b, labels=list(LABELS))
        if np.isfinite(k):
            kappas.append(float(k))
        else:
            undefined += 1
    return kappas, undefined


def inter_worker_agreement(data: CrowdData, *, min_shared: int = MIN_SHARED) -> Agreement:
    """Agreement between workers on the pairs several of them judged: Krippendorff's alpha with ties as
    a category and with ties dropped, the observed pairwise agreement, and the mean Cohen's kappa over
    worker pairs that share at least `min_shared` pairs (Light's kappa), with and without ties."""
    first = first_judgments(data)
    raters = first.groupby("unit")["worker"].transform("nunique")
    shared = first[raters >= 2]
    agree = [
        np.mean([a == b for a, b in itertools.combinations(labels, 2)])
        for labels in shared.groupby("unit")["label"].agg(list)
    ]
    answers = {w: dict(zip(g["unit"], g["label"], strict=True)) for w, g in shared.groupby("worker")}
    decisive = {w: {u: v for u, v in a.items() if v != "tie"} for w, a in answers.items()}
    kappas, undefined = _mean_kappa(answers, min_shared)
    kappas_nt, _ = _mean_kappa(decisive, min_shared)
    return Agreement(
        units=int(shared["unit"].nunique()),
        workers=int(shared["worker"].nunique()),
        judgments=len(shared),
        alpha_with_ties=krippendorff_nominal(shared),
        alpha_ties_dropped=krippendorff_nominal(shared, drop_ties=True),
        observed_agreement=float(np.mean(agree)) if agree else None,
        kappa_mean=float(np.mean(kappas)) if kappas else None,
        kappa_pairs=len(kappas),
        kappa_ties_dropped_mean=float(np.mean(kappas_nt)) if kappas_nt else None,
        kappa_ties_dropped_pairs=len(kappas_nt),
        kappa_undefined=undefined,
        min_shared=min_shared,
    )


# --- self-consistency ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfConsistency:
    repeats: int  # judgments that repeat an earlier judgment of the same pair by the same worker
    agree: int
    workers: int
    agreement: float | None
    per_worker: dict[str, tuple[int, int]]  # worker -> (agree, repeats)
    message: str | None = None


def self_consistency(data: CrowdData) -> SelfConsistency:
    """Where a worker judged the same pair twice: does the second judgment give the same label (the same
    response, or tie again)?"""
    j = data.judgments
    repeats = j[j["repeat_of"].notna()]
    if repeats.empty:
        return SelfConsistency(
            0, 0, 0, None, {},
            "No worker judged the same pair twice in this data: self-consistency cannot be measured "
            "(LLMFAO shows each worker each pair once).",
        )  # fmt: skip
    original = j.set_index("judgment")["label"]
    same = repeats["label"].to_numpy() == original.loc[repeats["repeat_of"].astype(int)].to_numpy()
    by = pd.DataFrame({"worker": repeats["worker"].to_numpy(), "same": same}).groupby("worker")["same"]
    per_worker = {str(w): (int(s.sum()), int(s.count())) for w, s in by}
    return SelfConsistency(
        repeats=len(repeats),
        agree=int(same.sum()),
        workers=len(per_worker),
        agreement=float(same.mean()),
        per_worker=per_worker,
    )


# --- the crowd against the GPT judges -----------------------------------------------------------------


def crowd_majority(data: CrowdData) -> pd.DataFrame:
    """Per pair: the votes for lo, hi and tie (each worker's first judgment) and the crowd's verdict, the
    label with the most votes; when lo and hi share the most votes the crowd is split and its verdict is
    tie (`split` marks it), and a tie vote with as many as the top decisive label is a tie too."""
    votes = first_judgments(data).pivot_table(index="unit", columns="label", values="worker", aggfunc="count")
    votes = votes.reindex(columns=list(LABELS), fill_value=0).fillna(0).astype(int)
    top = votes.max(axis=1)
    lo_top, hi_top = votes["lo"] == top, votes["hi"] == top
    verdict = np.where(lo_top & ~hi_top & (votes["tie"] < top), "lo", "tie")
    verdict = np.where(hi_top & ~lo_top & (votes["tie"] < top), "hi", verdict)
    return votes.assign(verdict=verdict, split=lo_top & hi_top)


@dataclass(frozen=True)
class JudgeAgreement:
    judge: str
    pairs: int
    kappa: float | None
    kappa_ci: tuple[float, float] | None
    agreement: float
    agreement_ci: tuple[float, float] | None
    decisive_pairs: int  # neither the crowd's verdict nor the judge's is a tie
    decisive_agreement: float | None
    decisive_agreement_ci: tuple[float, float] | None
    judge_ties: int


def _kappa(a: np.ndarray, b: np.ndarray) -> float:
    if len(np.union1d(a, b)) < 2:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(cohen_kappa_score(a, b, labels=[0, 1, 2]))


def _agreement(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a == b, axis=axis)


def _interval(statistic: Any, a: np.ndarray, b: np.ndarray, *, seed: int, resamples: int, vectorized: bool):
    """A percentile bootstrap interval resampling pairs (the rows of a and b together), seeded."""
    if len(a) < 2:
        return None
    res = stats.bootstrap(
        (a, b), statistic, paired=True, vectorized=vectorized, n_resamples=resamples,
        confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(seed),
    )  # fmt: skip
    low, high = res.confidence_interval
    return (float(low), float(high)) if np.isfinite(low) and np.isfinite(high) else None


def crowd_vs_judges(data: CrowdData, *, seed: int = SEED, resamples: int = RESAMPLES) -> list[JudgeAgreement]:
    """The crowd's majority verdict per pair against each judge's verdict on the same pair: Cohen's
    kappa (three labels) and raw agreement, and agreement on the pairs where neither says tie, each
    with a percentile bootstrap 95% interval resampling pairs."""
    crowd = crowd_majority(data)["verdict"]
    results = []
    for judge, rows in data.judges.groupby("judge", sort=False):
        both = rows.set_index("unit")["label"].to_frame("judge").join(crowd, how="inner")
        a = both["verdict"].map(CODE).to_numpy()
        b = both["judge"].map(CODE).to_numpy()
        decisive = (a != CODE["tie"]) & (b != CODE["tie"])
        kappa = _kappa(a, b)
        boot = {"seed": seed, "resamples": resamples}
        results.append(
            JudgeAgreement(
                judge=str(judge),
                pairs=len(both),
                kappa=kappa if np.isfinite(kappa) else None,
                kappa_ci=_interval(_kappa, a, b, vectorized=False, **boot),
                agreement=float(_agreement(a, b)),
                agreement_ci=_interval(_agreement, a, b, vectorized=True, **boot),
                decisive_pairs=int(decisive.sum()),
                decisive_agreement=float(_agreement(a[decisive], b[decisive])) if decisive.any() else None,
                decisive_agreement_ci=_interval(
                    _agreement, a[decisive], b[decisive], vectorized=True, **boot
                ),
                judge_ties=int((b == CODE["tie"]).sum()),
            )
        )
    return results


# --- Bradley-Terry rankings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranking:
    """Bradley-Terry scores of the models (evalica; a tie counts half a win to each side) from the crowd's
    judgments, with percentile bootstrap intervals resampling judgments, beside each judge's scores."""

    models: list[str]  # by crowd score, best first
    crowd: list[float]
    crowd_low: list[float]
    crowd_high: list[float]
    judges: dict[str, list[float]]  # judge -> scores in the order of `models` (NaN: the judge never saw it)
    spearman: dict[str, float | None]  # judge -> Spearman's rho with the crowd's (None: a constant side)
    spearman_p: dict[str, float | None]
    judgments: int


def _bt_inputs(frame: pd.DataFrame, models: dict[int, str]) -> tuple[pd.Series, pd.Series, list[Any]]:
    winners = {"lo": evalica.Winner.X, "hi": evalica.Winner.Y, "tie": evalica.Winner.Draw}
    lo = np.minimum(frame["left_id"], frame["right_id"])
    hi = np.maximum(frame["left_id"], frame["right_id"])
    return (
        pd.Series(lo).map(models),
        pd.Series(hi).map(models),
        [winners[v] for v in frame["label"]],
    )


def rankings(data: CrowdData, *, seed: int = SEED, resamples: int = RESAMPLES) -> Ranking:
    """The crowd's Bradley-Terry ranking of the models with bootstrap intervals, and each judge's."""
    crowd = first_judgments(data)
    xs, ys, ws = _bt_inputs(crowd, data.models)
    index = pd.Index(sorted(set(xs) | set(ys)))
    boot = evalica.bootstrap(
        evalica.bradley_terry, xs, ys, ws, index=index, n_resamples=resamples,
        confidence_level=CONFIDENCE, bootstrap_method="percentile", random_state=seed,
    )  # fmt: skip
    scores = evalica.bradley_terry(xs, ys, ws, index=index).scores.sort_values(ascending=False)
    order = list(scores.index)
    judges: dict[str, list[float]] = {}
    rho: dict[str, float | None] = {}
    rho_p: dict[str, float | None] = {}
    for judge, rows in data.judges.groupby("judge", sort=False):
        jx, jy, jw = _bt_inputs(rows, data.models)
        judged = evalica.bradley_terry(jx, jy, jw, index=index).scores.reindex(order)
        judges[str(judge)] = [float(v) for v in judged]
        if scores.nunique() < 2 or judged.nunique() < 2:  # Spearman's rho is undefined on a constant side
            rho[str(judge)] = rho_p[str(judge)] = None
            continue
        r = stats.spearmanr(scores.to_numpy(), judged.to_numpy())
        rho[str(judge)], rho_p[str(judge)] = float(r.statistic), float(r.pvalue)
    return Ranking(
        models=order,
        crowd=[float(v) for v in scores],
        crowd_low=[float(boot.low[m]) for m in order],
        crowd_high=[float(boot.high[m]) for m in order],
        judges=judges,
        spearman=rho,
        spearman_p=rho_p,
        judgments=len(crowd),
    )


# --- all of it ----------------------------------------------------------------------------------------


@dataclass
class CrowdAnalysis:
    source: str
    judgments: int
    workers: int
    pairs: int
    ties: int
    agreement: Agreement
    consistency: SelfConsistency
    judges: list[JudgeAgreement]
    ranking: Ranking
    verdicts: dict[str, int]  # the crowd's verdicts: lo/hi (decisive), tie by vote, split
    seed: int
    resamples: int
    attribution: str | None
    license: str | None
    baselines: Any = None  # the few-shot baselines (modeling.analysis.crowd_baselines), when run
    models: Any = None  # the few-shot table's model rows (modeling.analysis.crowd_models), when run
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def analyze_crowd(data: CrowdData, *, seed: int = SEED, resamples: int = RESAMPLES) -> CrowdAnalysis:
    """Every crowd analysis, seeded: agreement between workers, self-consistency, the crowd against each
    judge, and the Bradley-Terry rankings."""
    majority = crowd_majority(data)
    split = int(majority["split"].sum())
    return CrowdAnalysis(
        source=str(data.manifest.get("domain_source", "")),
        judgments=len(data.judgments),
        workers=int(data.judgments["worker"].nunique()),
        pairs=int(data.judgments["unit"].nunique()),
        ties=int((data.judgments["label"] == "tie").sum()),
        agreement=inter_worker_agreement(data),
        consistency=self_consistency(data),
        judges=crowd_vs_judges(data, seed=seed, resamples=resamples),
        ranking=rankings(data, seed=seed, resamples=resamples),
        verdicts={
            "decisive": int((majority["verdict"] != "tie").sum()),
            "tie_by_vote": int((majority["verdict"] == "tie").sum()) - split,
            "split": split,
        },
        seed=seed,
        resamples=resamples,
        attribution=data.manifest.get("attribution"),
        license=data.manifest.get("license"),
    )
