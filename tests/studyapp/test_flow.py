import pytest

from studyapp.flow import STEP_OF_STATE, STEPS, Step, participant_next_step, participant_progress
from studyapp.models import Participant

State = Participant.State


def test_it_sends_a_new_participant_to_consent() -> None:
    assert participant_next_step(Participant()) == Step("consent")


def test_it_resumes_elicitation_at_the_first_pair_not_yet_picked() -> None:
    participant = Participant(state=State.ELICITATION, n_picks=9, picks_done=4)

    assert participant_next_step(participant) == Step("elicitation", 4)


def test_it_resumes_rating_at_the_first_item_not_yet_rated() -> None:
    participant = Participant(state=State.RATING, n_ratings=14, ratings_done=13)

    assert participant_next_step(participant) == Step("rating", 13)


def test_it_keeps_a_participant_on_the_waiting_page_until_their_responses_are_stored() -> None:
    participant = Participant(state=State.WAITING, n_picks=9, picks_done=9, generation="ready")

    assert participant_next_step(participant) == Step("waiting")


@pytest.mark.parametrize("state", Participant.FINISHED_STATES)
def test_it_ends_every_finished_state_on_the_done_page(state: str) -> None:
    assert participant_next_step(Participant(state=state)) == Step("done")


@pytest.mark.parametrize("state", [State.RETURNED, State.TIMED_OUT])
def test_it_never_sends_a_returned_or_timed_out_participant_back_to_an_unfinished_step(state: str) -> None:
    participant = Participant(state=state, n_picks=9, picks_done=4, n_ratings=14, ratings_done=2)

    assert participant_next_step(participant) == Step("done")
    assert participant.is_finished and participant.is_excluded and not participant.may_withdraw


def test_it_has_a_step_for_every_state() -> None:
    assert set(STEP_OF_STATE) == set(State.values)
    assert set(STEP_OF_STATE.values()) <= {spec.name for spec in STEPS}


def test_it_counts_progress_as_step_k_of_n_and_item_i_of_m() -> None:
    participant = Participant(state=State.ELICITATION, n_picks=9, picks_done=2)

    progress = participant_progress(participant, participant_next_step(participant))

    assert progress is not None
    assert (progress.current, progress.total, progress.item, progress.items) == (3, 6, 3, 9)


def test_it_shows_no_progress_on_the_last_page() -> None:
    participant = Participant(state=State.COMPLETED)

    assert participant_progress(participant, participant_next_step(participant)) is None
