from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from django.utils import timezone
from scipy.stats import binomtest

from annotation.models import GeneratedResponse, Rating, Side
from modeling.synth import generate_dataset
from studyapp.models import Arm, Participant, Study
from studyapp.selectors import (
    Outcome,
    participant_outcome,
    study_dashboard,
    study_evaluation_draft,
    study_participants,
)
from studyapp.services import (
    participant_enroll,
    participant_mark_returned,
    participant_withdraw,
    participants_expire,
    survey_record,
)
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


def test_it_computes_win_rates_with_an_interval_over_participants_and_a_one_sided_sign_test() -> None:
    study = make_study(n_eval_questions=2)  # two pairs per participant, plus a repeat and an attention check
    outcomes = [[True, True], [True, False], [True, True], [False, True]]
    for arm_wins in outcomes:
        rate_preferring(participant_rating(study), arm_wins)

    (wr,) = study_dashboard(study=study).win_rates

    # Participants resampled in the canonical order (wins, then ratings), 2,000 times from seed 0.
    per = np.array(sorted((float(sum(o)), float(len(o))) for o in outcomes))
    idx = np.random.default_rng(0).integers(0, len(per), size=(2000, len(per)))
    ratios = per[idx, 0].sum(axis=1) / per[idx, 1].sum(axis=1)
    assert (wr.arm, wr.baseline, wr.wins, wr.n, wr.participants) == ("fspo", "base", 6, 8, 4)
    assert wr.rate == pytest.approx(6 / 8)
    assert (wr.ci_low, wr.ci_high) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])), abs=1e-12)
    assert wr.p_value == pytest.approx(binomtest(6, 8, 0.5, alternative="greater").pvalue)


def test_it_gives_one_participants_win_rate_without_an_interval() -> None:
    study = make_study(n_eval_questions=2)
    rate_preferring(participant_rating(study), [True, False])

    (wr,) = study_dashboard(study=study).win_rates

    assert (wr.wins, wr.n, wr.rate, wr.ci_low, wr.ci_high) == (1, 2, 0.5, None, None)
    assert wr.message == "One participant: an interval over participants needs at least two."


def test_it_counts_a_pair_of_identical_responses_as_half_a_win() -> None:
    study = make_study(n_eval_questions=2)
    participant = participant_rating(study)
    first = participant.rating_items.filter(is_repeat=False, is_attention_check=False).order_by("position")[0]
    GeneratedResponse.objects.filter(pk=first.right_id).update(text=first.left.text)
    rate_preferring(participant, [True, True])

    (wr,) = study_dashboard(study=study).win_rates

    assert (wr.wins, wr.n, wr.rate) == (1.5, 2, 0.75)
    assert wr.p_value == pytest.approx(binomtest(1, 1, 0.5, alternative="greater").pvalue)  # ties left out


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
    assert (dashboard.participants, dashboard.completed, dashboard.places_taken) == (6, 3, 4)
    assert dashboard.median_completion_s == 20 * 60
    assert dashboard.to_json()["median_completion"] == "20 min 0 s"


def time_out(participant: Participant) -> None:
    Participant.objects.filter(pk=participant.pk).update(updated_at=timezone.now() - timedelta(days=1))
    participants_expire(study=participant.study)


def test_it_counts_returned_and_timed_out_participants_on_the_last_step_without_a_place() -> None:
    study: Study = make_study(quota=10)
    make_participant(study)
    time_out(participant_at_elicitation(study))
    participant_mark_returned(participant=participant_rating(study))
    complete(rate_all(participant_rating(study)), 10)

    dashboard = study_dashboard(study=study)

    steps = {row.step: row.count for row in dashboard.by_step}
    assert (steps["consent"], steps["elicitation"], steps["rating"], steps["done"]) == (1, 0, 0, 3)
    assert (dashboard.by_state["timed_out"], dashboard.by_state["returned"]) == (1, 1)
    assert (dashboard.participants, dashboard.completed, dashboard.places_taken) == (4, 1, 1)
    assert dashboard.excluded == 2
    assert dashboard.to_json()["by_state"]["timed_out"] == 1


def test_it_leaves_the_ratings_of_returned_and_timed_out_participants_out_of_the_win_rates() -> None:
    study = make_study(n_eval_questions=2)
    counted = participant_rating(study)
    rate_preferring(counted, [True, False])
    timed_out, returned = participant_rating(study), participant_rating(study)
    for participant in (timed_out, returned):
        rate_preferring(participant, [True, True])
    time_out(timed_out)
    participant_mark_returned(participant=returned)

    dashboard = study_dashboard(study=study)

    (wr,) = dashboard.win_rates
    assert (wr.wins, wr.n, dashboard.ratings) == (1, 2, 2)
    assert Rating.objects.filter(item__participant__in=[timed_out, returned]).count() == 2 * 4  # kept


def mark_returned(participant: Participant) -> None:
    participant_mark_returned(participant=participant)


@pytest.mark.parametrize(("end", "kind"), [(mark_returned, "returned"), (time_out, "timed_out")])
def test_it_gives_no_code_to_a_participant_who_returned_or_timed_out(end, kind: str) -> None:
    participant = participant_at_elicitation(make_study())
    end(participant)
    participant.refresh_from_db()

    assert participant_outcome(participant=participant) == Outcome(kind, "", "")


def test_it_finds_a_participant_by_prolific_pid_session_id_or_token() -> None:
    study = make_study()
    wanted = participant_enroll(study=study, recruitment_id="5f1a2b", recruitment_session_id="sess-42")
    make_participant(study, recruitment_id="someone-else")

    found = {
        search: list(study_participants(study=study, search=search))
        for search in ("5f1a2b", "sess-42", wanted.token[:8], wanted.token.upper())
    }

    assert found == dict.fromkeys(found, [wanted])
    assert study_participants(study=study, search="nobody").count() == 0
    assert study_participants(study=study).count() == 2


def test_it_drafts_an_evaluation_of_the_studys_arms(settings, tmp_path: Path) -> None:
    settings.STUDIO_DATA_DIR = str(tmp_path)
    generate_dataset(
        out_dir=tmp_path / "datasets" / "reviews-small", domain="reviews", users=4, pairs_per_user=2
    )
    generate_dataset(out_dir=tmp_path / "datasets" / "elix-small", domain="elix", users=4, pairs_per_user=2)
    (tmp_path / "evaluations" / "study-x-arms").mkdir(parents=True)
    study = make_study(slug="study-x", n_pairs=3, checkpoint=f"hf:{tmp_path}/checkpoints/fspo")
    Arm.objects.create(study=study, name="cot", method=Arm.Method.FSPO_COT, checkpoint="/elsewhere/cot")
    Arm.objects.create(study=study, name="served", method=Arm.Method.FSPO, checkpoint="http://gpu:8000/v1#m")

    draft = study_evaluation_draft(study=study)

    assert draft.initial == {
        "study": study.pk,
        "name": "study-x-arms-2",
        "dataset": "datasets/reviews-small",
        "arms": "fspo=checkpoints/fspo\nbase=checkpoints/fspo:none\ncot=/elsewhere/cot:cot",
        "baseline": "base",
        "shots": 3,
    }
    assert draft.left_out == [
        "served: http://gpu:8000/v1#m is a served model; an evaluation loads checkpoint folders."
    ]
