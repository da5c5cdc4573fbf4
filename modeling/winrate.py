"""What a win rate is: the one definition behind `fspo eval`'s tables, the study dashboard, the studio's
analysis page and `fspo analyze`.

A win rate compares an arm with a baseline over judged pairs. Each judgment scores 1 when the arm's
response was preferred, 0 when the baseline's was, and 1/2 for a tie (a judge that cannot tell the two
apart, or two responses of the same text: whatever was clicked, neither was better). The win rate is the
mean score, ties counting as halves, as the paper and AlpacaEval report it.

Its 95% interval and its test depend on what the judgments are independent draws of, so the caller names
that choice (`over`), and the result says which it was:

- ``"comparisons"`` (`fspo eval`, synthetic users): each comparison is its own held-out episode judged
  by the oracle or an LLM, so comparisons are exchangeable. Interval: percentile bootstrap over
  comparisons (``scipy.stats.bootstrap`` of the mean, 5,000 resamples, ``default_rng(seed)``); a point
  when every score is the same. Test: one-sided binomial test of floor(wins) of n against 1/2 (ties as
  halves, rounded down), as `fspo eval` has always reported it.
- ``"participants"`` (human studies): one person's ratings are not independent of each other (they
  share that person's taste), so the interval resamples participants, not ratings: percentile bootstrap
  of the pooled share, 2,000 resamples (`modeling.analysis.stats.participant_bootstrap`). Participants
  are put in a canonical order (by their wins, then their ratings) before resampling, so the interval
  depends on the ratings alone, not on how participants are named or listed: the live dashboard and the
  analysis page give the same interval for the same ratings. With one participant there is no interval
  (it would measure that one person's taste, not the population's), and `message` says so. Test: the
  binomial sign test of the decisive ratings (ties left out), one-sided (the arm wins more than half the
  time: the paper's test) and two-sided.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

Over = Literal["comparisons", "participants"]
WIN, TIE, LOSS = 1.0, 0.5, 0.0
CONFIDENCE = 0.95
SEED = 0
RESAMPLES: dict[str, int] = {"comparisons": 5000, "participants": 2000}  # bootstrap resamples by `over`
ONE_PARTICIPANT = "One participant: an interval over participants needs at least two."
ALL_TIES = "Every rating is a tie: there is nothing to test."


def rating_scores(arm_won: Sequence[bool] | np.ndarray, same_text: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Each rating's score: 1 when the arm's response was chosen, 0 when the baseline's was, 1/2 when the
    two responses are the same text."""
    won = np.asarray(arm_won, dtype=bool)
    return np.where(np.asarray(same_text, dtype=bool), TIE, np.where(won, WIN, LOSS))


@dataclass(frozen=True)
class WinRate:
    """A win rate: `wins` (ties as halves) of `n` judgments, `ties` of them ties, the mean score, its
    interval (None where `over` cannot give one; `message` says why), and the one-sided (`p_value`: the
    arm wins more than half the time) and two-sided p-values of the test. `participants` counts the
    people judging when `over` is "participants"."""

    n: int
    win_rate: float
    ci_low: float | None
    ci_high: float | None
    wins: float
    ties: int
    p_value: float | None
    p_two_sided: float | None = None
    over: Over = "comparisons"
    participants: int | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, float | None]:
        """The columns of `fspo eval`'s tables (results.json): n, win_rate, ci_low, ci_high, wins, ties
        and p_value, as floats."""
        row = (self.n, self.win_rate, self.ci_low, self.ci_high, self.wins, self.ties, self.p_value)
        keys = ("n", "win_rate", "ci_low", "ci_high", "wins", "ties", "p_value")
        return {k: None if v is None else float(v) for k, v in zip(keys, row, strict=True)}


def win_rate(
    scores: Sequence[float] | np.ndarray,
    *,
    over: Over,
    participants: Sequence[Hashable] | None = None,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
    resamples: int | None = None,
) -> WinRate:
    """The win rate of per-judgment `scores` (1 win, 0.5 tie, 0 loss) with its interval and test, the
    interval resampling `over` comparisons or participants (see the module's docstring);
    `participants[i]` names who gave judgment i (required with over="participants"). `resamples`
    defaults to 5,000 over comparisons and 2,000 over participants. Raises ValueError without scores."""
    if over not in RESAMPLES:
        raise ValueError(f"a win rate's interval is over 'comparisons' or 'participants', not {over!r}")
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no comparisons to compute a win rate from")
    resamples = RESAMPLES[over] if resamples is None else resamples
    if over == "comparisons":
        return _over_comparisons(s, confidence=confidence, seed=seed, resamples=resamples)
    if participants is None or len(participants) != s.size:
        raise ValueError("a win rate over participants needs the participant of every score")
    return _over_participants(s, participants, confidence=confidence, seed=seed, resamples=resamples)


def _over_comparisons(s: np.ndarray, *, confidence: float, seed: int, resamples: int) -> WinRate:
    if s.size == 1 or np.all(s == s[0]):
        lo = hi = float(s.mean())
    else:
        res = stats.bootstrap(
            (s,),
            np.mean,
            confidence_level=confidence,
            n_resamples=resamples,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    wins = float(s.sum())
    test = stats.binomtest(int(np.floor(wins)), int(s.size), 0.5, alternative="greater")
    return WinRate(
        n=int(s.size),
        win_rate=float(s.mean()),
        ci_low=lo,
        ci_high=hi,
        wins=wins,
        ties=int((s == TIE).sum()),
        p_value=float(test.pvalue),
        p_two_sided=float(stats.binomtest(int(np.floor(wins)), int(s.size), 0.5).pvalue),
    )


def _over_participants(
    s: np.ndarray, participants: Sequence[Hashable], *, confidence: float, seed: int, resamples: int
) -> WinRate:
    # Imported here: modeling.analysis loads pandas and pyarrow, which `fspo eval` does not need.
    from .analysis.stats import participant_bootstrap, sign_test

    sums: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    for who, score in zip(participants, s.tolist(), strict=True):
        sums[who] = sums.get(who, 0.0) + score
        counts[who] = counts.get(who, 0) + 1
    per = np.array(sorted((sums[who], counts[who]) for who in sums), dtype=np.float64)  # canonical order
    wins, n = float(per[:, 0].sum()), int(s.size)
    low = high = None
    messages = []
    if len(per) >= 2:
        low, high = participant_bootstrap(
            per[:, 0], per[:, 1], seed=seed, resamples=resamples, confidence=confidence
        )
    else:
        messages.append(ONE_PARTICIPANT)
    test = sign_test(int((s == WIN).sum()), int((s == LOSS).sum()))
    if test is None:
        messages.append(ALL_TIES)
    return WinRate(
        n=n,
        win_rate=wins / n,
        ci_low=low,
        ci_high=high,
        wins=wins,
        ties=int((s == TIE).sum()),
        p_value=None if test is None else test.p_greater,
        p_two_sided=None if test is None else test.p_two_sided,
        over="participants",
        participants=len(per),
        message=" ".join(messages) or None,
    )
