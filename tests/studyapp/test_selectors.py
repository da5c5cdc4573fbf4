from datetime import timedelta

import pytest
from scipy.stats import binomtest

from annotation.models import Side
from annotation.services import survey_record
from studyapp.models import Participant, Study
from studyapp.selectors import study_dashboard
from studyapp.services import participant_withdraw
from tests.factories import (
    make_participant,
    make_study,
    participant_at_elicitation,
    participant_rating,
    rate,
    rate_all,
)

pytestmark = pytest.mark.django_db


def rate_preferring(participant: Participant, arm_wins: list[bool]) -> None:
    """Rate every item: on each original pair the FSPO arm's side when the next of `arm_wins` is True,
    else the baseline's; repeats and attention checks answered with the other side (they must not count)."""
    wins = iter(arm_wins)
    for item in participant.rating_items.select_related("left__arm", "right__arm").order_by("position"):
        if item.is_attention_check:
            choice = item.expected_choice
        elif item.is_repeat:
            choice = Side.RIGHT if item.left.arm.name == "fspo" else Side.LEFT  # the baseline, always
        else:
            fspo_side = Side.LEFT if item.left.arm.name == "fspo" else Side.RIGHT
            baseline_side = Side.RIGHT if fspo_side == Side.LEFT else Side.LEFT
            choice = fspo_side if next(wins) else baseline_side
        rate(participant, item.position, choice)
    assert next(wins, None) is None, "more outcomes than rated pairs"


def complete(participant: Participant, minutes: int) -> None:
    """Finish the survey, then set the participant's time from consent to the end to `minutes`."""
    survey_record(participant=participant, answers={})
    participant.refresh_from_db()
    Participant.objects.filter(pk=participant.pk).update(
        finished_at=participant.consented_at + timedelta(minutes=minutes)
    )


def test_it_computes_win_rates_with_wilson_intervals_and_a_one_sided_test_that_match_scipy() -> None:
    study = make_study(n_eval_questions=2)  # two pairs per participant, plus a repeat and an attention check
    outcomes = [[True, True], [True, False], [True, True], [False, True]]
    for arm_wins in outcomes:
        rate_preferring(participant_rating(study), arm_wins)

    (wr,) = study_dashboard(study=study).win_rates

    wins, n = sum(map(sum, outcomes)), sum(map(len, outcomes))
    ci = binomtest(wins, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (wr.arm, wr.baseline, wr.wins, wr.n) == ("fspo", "base", 6, 8)
    assert wr.rate == pytest.approx(6 / 8)
    assert (wr.ci_low, wr.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert wr.p_value == pytest.approx(binomtest(wins, n, 0.5, alternative="greater").pvalue)


def test_it_shows_no_win_rate_before_the_first_rating() -> None:
    study = make_study()
    participant_rating(study)

    (wr,) = study_dashboard(study=study).win_rates

    assert (wr.wins, wr.n, wr.rate, wr.ci_low, wr.ci_high, wr.p_value) == (0, 0, None, None, None, None)


def test_it_counts_participants_by_step_and_state_and_the_median_time_to_complete() -> None:
    study: Study = make_study(quota=10)
    make_participant(study)
    participant_at_elicitation(study)
    participant_withdraw(participant=participant_at_elicitation(study))
    for minutes in (10, 20, 60):
        complete(rate_all(participant_rating(study)), minutes)

    dashboard = study_dashboard(study=study)

    assert {row.step: row.count for row in dashboard.by_step} == {
        "consent": 1,
        "instructions": 0,
        "elicitation": 1,
        "waiting": 0,
        "rating": 0,
        "survey": 0,
        "done": 4,
    }
    assert (dashboard.by_state["completed"], dashboard.by_state["withdrawn"]) == (3, 1)
    assert (dashboard.participants, dashboard.completed, dashboard.places_taken) == (6, 3, 5)
    assert dashboard.median_completion_s == 20 * 60
    assert dashboard.to_json()["median_completion"] == "20 min 0 s"
