"""The scripted participant's page readers (studyapp.scripted_participant) on the pages the site renders:
what its walk relies on to read a pick or a rating page. The walk itself runs against real processes in
tests/studyapp/test_demo_site.py (`manage.py demo_site --check`) and tests/test_bench_site.py."""

import pytest

from annotation.models import Side
from studyapp.models import Participant
from studyapp.scripted_participant import (
    CheckFailed,
    PrefersShort,
    attention_check_side,
    form_field,
    response_texts,
    step_of,
)
from tests.factories import make_study, participant_at_elicitation, participant_rating
from tests.support import browser_of

pytestmark = pytest.mark.django_db


def page_of(participant: Participant, step: str) -> str:
    return browser_of(participant).get(f"/s/{participant.study.slug}/{step}").content.decode()


def test_it_reads_a_pick_pages_two_responses_and_its_item() -> None:
    participant = participant_at_elicitation(make_study())
    item = participant.elicitation_items.get(position=0)

    page = page_of(participant, "pick/1/")

    assert response_texts(page) == (item.text_on(Side.LEFT), item.text_on(Side.RIGHT))
    assert form_field(page, "item") == str(item.pk)
    assert attention_check_side(page) is None


def test_it_answers_an_attention_check_as_it_asks() -> None:
    participant = participant_rating(make_study(attention_checks=1))
    check = participant.rating_items.get(is_attention_check=True)
    participant.ratings_done = check.position
    participant.save()

    page = page_of(participant, f"rate/{check.position + 1}/")

    assert attention_check_side(page) == check.expected_choice


def test_it_prefers_the_shorter_response() -> None:
    participant = participant_at_elicitation(make_study())
    item = participant.elicitation_items.get(position=0)
    left, right = item.text_on(Side.LEFT), item.text_on(Side.RIGHT)

    side = PrefersShort().side(page_of(participant, "pick/1/"))

    assert side == (Side.LEFT if len(left) <= len(right) else Side.RIGHT)


def test_it_says_which_field_a_page_lacks() -> None:
    with pytest.raises(CheckFailed, match="the page has no 'item' field"):
        form_field("<form></form>", "item")


def test_it_names_the_step_of_a_participant_address() -> None:
    assert [step_of(p) for p in ("/s/x/pick/3/", "/s/x/waiting/", "/s/x/")] == ["pick", "waiting", "entry"]
