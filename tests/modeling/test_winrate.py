"""The one win rate (modeling.winrate): its score, its interval over comparisons (`fspo eval`) or over
participants (human studies), and its tests, checked against scipy and numpy computed here."""

import numpy as np
import pytest
from scipy import stats

from modeling.winrate import rating_scores, win_rate


def test_it_counts_ties_as_halves_with_an_interval_over_comparisons_and_a_one_sided_test() -> None:
    w = win_rate([1, 1, 0, 0.5] * 25, over="comparisons")

    assert w.win_rate == pytest.approx(0.625)
    assert (w.ties, w.n, w.over) == (25, 100, "comparisons")
    assert w.ci_low < 0.625 < w.ci_high
    assert w.ci_low > 0.5  # 100 comparisons at 62.5% exclude a coin flip
    assert w.p_value == pytest.approx(stats.binomtest(62, 100, 0.5, alternative="greater").pvalue)
    coin = win_rate([1, 0] * 20, over="comparisons")
    assert coin.ci_low < 0.5 < coin.ci_high and coin.p_value > 0.4


def test_its_interval_over_comparisons_is_scipys_percentile_bootstrap_from_seed_0() -> None:
    scores = np.array([1, 0, 0.5, 1, 1, 0, 1] * 5, dtype=float)

    w = win_rate(scores, over="comparisons")

    ci = stats.bootstrap(
        (scores,), np.mean, confidence_level=0.95, n_resamples=5000, method="percentile",
        random_state=np.random.default_rng(0),
    ).confidence_interval  # fmt: skip
    assert (w.ci_low, w.ci_high) == (ci.low, ci.high)
    assert w.to_dict() == {
        "n": 35.0, "win_rate": w.win_rate, "ci_low": ci.low, "ci_high": ci.high, "wins": 22.5, "ties": 5.0,
        "p_value": w.p_value,
    }  # fmt: skip
    assert win_rate([1.0] * 4, over="comparisons").ci_low == 1.0  # one value: the interval is a point


def test_its_interval_over_participants_resamples_people_in_a_canonical_order() -> None:
    scores = [1, 1, 0, 1, 0, 0.5, 1, 1, 1, 0]
    people = ["c", "c", "a", "a", "b", "b", "d", "d", "d", "e"]

    w = win_rate(scores, over="participants", participants=people, seed=3)

    per = np.array(sorted([(2.0, 2.0), (1.0, 2.0), (0.5, 2.0), (3.0, 3.0), (0.0, 1.0)]))
    idx = np.random.default_rng(3).integers(0, 5, size=(2000, 5))
    ratios = per[idx, 0].sum(axis=1) / per[idx, 1].sum(axis=1)
    assert (w.wins, w.n, w.ties, w.participants, w.over) == (6.5, 10, 1, 5, "participants")
    assert (w.ci_low, w.ci_high) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])), abs=1e-12)
    renamed = win_rate(
        scores[::-1], over="participants", participants=[p.upper() for p in people[::-1]], seed=3
    )
    assert (renamed.ci_low, renamed.ci_high) == (w.ci_low, w.ci_high)


def test_its_test_over_participants_is_the_sign_test_of_the_decisive_ratings() -> None:
    w = win_rate([1, 1, 1, 0.5, 0], over="participants", participants=[1, 2, 3, 4, 5])

    assert w.p_value == pytest.approx(stats.binomtest(3, 4, 0.5, alternative="greater").pvalue)
    assert w.p_two_sided == pytest.approx(stats.binomtest(3, 4, 0.5).pvalue)


def test_one_participant_gets_a_rate_but_no_interval_and_all_ties_no_test() -> None:
    w = win_rate([0.5, 0.5], over="participants", participants=[7, 7])

    assert (w.win_rate, w.ci_low, w.ci_high, w.p_value) == (0.5, None, None, None)
    assert w.message == (
        "One participant: an interval over participants needs at least two. "
        "Every rating is a tie: there is nothing to test."
    )


def test_it_scores_the_arm_1_the_baseline_0_and_identical_responses_a_half() -> None:
    assert rating_scores([True, False, True, False], [False, False, True, True]).tolist() == [1, 0, 0.5, 0.5]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: win_rate([], over="comparisons"), "no comparisons"),
        (lambda: win_rate([1, 0], over="participants"), "the participant of every score"),
        (lambda: win_rate([1, 0], over="ratings"), "'comparisons' or 'participants'"),  # type: ignore[arg-type]
    ],
)
def test_it_refuses_what_it_cannot_compute(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
