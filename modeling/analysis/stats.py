"""The statistics the study analyses use, as small pure functions on arrays.

- `participant_bootstrap`: a percentile interval of a pooled ratio (wins / ratings, consistent / repeats)
  resampling participants, not judgments: one participant's answers are not independent of each other.
- `sign_test`: the one- and two-sided binomial (sign) test of decisive judgments, ties left out.
- `cohen_kappa`, `krippendorff_alpha_nominal`: agreement beyond chance.
- `js_divergence`, `tv_distance`: how far two categorical distributions are apart.
- `normal_gap_interval`: the interval of a difference of two independent estimates from their intervals.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..winrate import CONFIDENCE, RESAMPLES, SEED

DEFAULT_RESAMPLES = RESAMPLES["participants"]
DEFAULT_SEED = SEED


def participant_bootstrap(
    sums: Sequence[float] | np.ndarray,
    counts: Sequence[float] | np.ndarray,
    *,
    seed: int = DEFAULT_SEED,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(sums) / sum(counts), resampling participants.

    `sums[i]` and `counts[i]` are participant i's total (wins, with ties as halves) and number of
    judgments. Each resample draws len(sums) participants with replacement from
    `numpy.random.default_rng(seed)` (one `integers(0, k, size=(resamples, k))` call), so the interval is
    reproducible from the seed. Needs at least two participants."""
    s = np.asarray(sums, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if s.shape != n.shape or s.ndim != 1:
        raise ValueError("sums and counts must be two 1-D arrays of the same length")
    if len(s) < 2:
        raise ValueError("a bootstrap over participants needs at least two participants")
    if np.any(n <= 0):
        raise ValueError("every participant must have at least one judgment")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(s), size=(resamples, len(s)))
    ratios = s[idx].sum(axis=1) / n[idx].sum(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class SignTest:
    """Decisive judgments (ties left out): `wins` of `decisive`. p-values of the binomial test against
    1/2: `p_greater` (the arm wins more than half the time, the paper's test) and `p_two_sided`."""

    wins: int
    decisive: int
    p_greater: float
    p_two_sided: float


def sign_test(wins: int, losses: int) -> SignTest | None:
    """The sign test of `wins` against `losses` (None when there is no decisive judgment)."""
    decisive = wins + losses
    if decisive == 0:
        return None
    return SignTest(
        wins=wins,
        decisive=decisive,
        p_greater=float(stats.binomtest(wins, decisive, 0.5, alternative="greater").pvalue),
        p_two_sided=float(stats.binomtest(wins, decisive, 0.5).pvalue),
    )


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two raters' labels of the same items: (p_o - p_e) / (1 - p_e), with p_e from
    each rater's own label frequencies. None when p_e is 1 (both raters always gave one same label:
    agreement beyond chance is undefined)."""
    if len(first) != len(second):
        raise ValueError("both raters must label the same items")
    if not first:
        return None
    labels = sorted(set(first) | set(second), key=repr)
    a = np.array([labels.index(x) for x in first])
    b = np.array([labels.index(x) for x in second])
    observed = float(np.mean(a == b))
    pa = np.bincount(a, minlength=len(labels)) / len(a)
    pb = np.bincount(b, minlength=len(labels)) / len(b)
    expected = float(np.dot(pa, pb))
    if expected >= 1.0 - 1e-12:
        return None
    return (observed - expected) / (1.0 - expected)


def krippendorff_alpha_nominal(units: Iterable[Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal data: 1 - D_o / D_e from the coincidence matrix.

    `units` holds, per unit (an item), the values the raters who judged it gave (missing raters simply
    absent). Units with fewer than two values cannot be paired and are left out. Each unit with m values
    adds 1/(m - 1) to o[c, k] for every ordered pair of its values from different raters; with n_c the
    marginals and n their total, alpha = 1 - (n - 1) * sum_{c != k} o[c, k] / sum_{c != k} n_c n_k.
    None when nothing is pairable or every value is the same (D_e = 0)."""
    paired = [list(u) for u in units if len(u) >= 2]
    if not paired:
        return None
    labels = sorted({v for u in paired for v in u}, key=repr)
    index = {v: i for i, v in enumerate(labels)}
    o = np.zeros((len(labels), len(labels)))
    for u in paired:
        counts = np.bincount([index[v] for v in u], minlength=len(labels)).astype(np.float64)
        # Ordered pairs of values from different raters: counts_c * counts_k off the diagonal and
        # counts_c * (counts_c - 1) on it.
        o += (np.outer(counts, counts) - np.diag(counts)) / (len(u) - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    disagree_observed = o.sum() - np.trace(o)
    disagree_expected = (n_c.sum() ** 2 - np.sum(n_c**2)) / (n - 1)
    if disagree_expected <= 0:
        return None
    return float(1.0 - disagree_observed / disagree_expected)


def _distributions(
    p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    pa, qa = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if pa.shape != qa.shape or pa.sum() <= 0 or qa.sum() <= 0 or np.any(pa < 0) or np.any(qa < 0):
        raise ValueError("two non-negative weight vectors of the same length, each with a positive sum")
    return pa / pa.sum(), qa / qa.sum()


def js_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0: the same distribution, 1: disjoint supports) of two
    distributions over the same categories (weights are normalized)."""
    pa, qa = _distributions(p, q)
    m = (pa + qa) / 2

    def kl(x: np.ndarray) -> float:
        keep = x > 0
        return float(np.sum(x[keep] * np.log2(x[keep] / m[keep])))

    return max(0.0, (kl(pa) + kl(qa)) / 2)


def tv_distance(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Total variation distance (0 to 1): the share of one population that would have to move to
    another category to match the other."""
    pa, qa = _distributions(p, q)
    return float(np.abs(pa - qa).sum() / 2)


def normal_gap_interval(
    first: tuple[float, float, float],
    second: tuple[float, float, float],
    *,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """(gap, low, high) of first - second, two independent estimates each given as (estimate, low, high)
    of a `confidence` interval: each standard error is read back as the interval's width / (2 z), and the
    gap's interval is gap +- z * sqrt(se_1^2 + se_2^2) (normal approximation)."""
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    se = [(high - low) / (2 * z) for _, low, high in (first, second)]
    gap = first[0] - second[0]
    half = z * float(np.hypot(se[0], se[1]))
    return gap, gap - half, gap + half
