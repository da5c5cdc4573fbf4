import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from annotation.models import ElicitationPick, GeneratedResponse, Rating, RatingItem, Side, SurveyResponse
from studyapp.models import Participant, Study
from studyapp.services import (
    participant_mark_returned,
    participants_expire,
    personalize_enqueue,
    recruitment_id_hash,
)
from tests.factories import (
    make_participant,
    make_study,
    participant_at_elicitation,
    participant_rating,
    participant_waiting,
    pick,
    rate_all,
)
from tests.support import browser_of

pytestmark = pytest.mark.django_db
State = Participant.State


def url(study: Study, path: str = "") -> str:
    return f"/s/{study.slug}/{path}"


def post_pick(client: Client, participant: Participant, position: int, choice: str = "left", item_id=None):
    item_id = item_id if item_id is not None else participant.elicitation_items.get(position=position).pk
    return client.post(url(participant.study, f"pick/{position + 1}/"), {"item": item_id, "choice": choice})


def post_rating(client: Client, participant: Participant, position: int, **fields: object):
    item = participant.rating_items.get(position=position)
    data = {"item": item.pk, "choice": "left", "strength": 4, "reason": "", **fields}
    return client.post(url(participant.study, f"rate/{position + 1}/"), data)


def join(client: Client, study: Study, params: dict[str, str] | None = None, decision: str = "agree"):
    """Open the study link, then decide on the consent page it leads to (the form's own fields)."""
    page = client.get(url(study), params or {}, follow=True)
    enrolment = re.search(r'name="enrolment" value="([^"]+)"', page.content.decode())
    assert enrolment, page.content.decode()[:500]
    return client.post(
        page.request["PATH_INFO"] + "?" + page.request["QUERY_STRING"],
        {"decision": decision, "enrolment": enrolment.group(1)},
    )


def test_it_sends_a_newcomer_to_consent_with_the_links_parameters_and_stores_nothing(client: Client) -> None:
    study = make_study()

    response = client.get(url(study), {"PROLIFIC_PID": "5f1a2b", "STUDY_ID": "st-1", "SESSION_ID": "se-1"})

    assert response.status_code == 302
    assert response.url == url(study, "consent/?PROLIFIC_PID=5f1a2b&STUDY_ID=st-1&SESSION_ID=se-1")
    assert client.get(response.url).status_code == 200
    assert not Participant.objects.filter(study=study).exists()


def test_it_enrolls_a_prolific_participant_when_they_consent(client: Client) -> None:
    study = make_study()

    response = join(client, study, {"PROLIFIC_PID": "5f1a2b", "STUDY_ID": "st-1", "SESSION_ID": "se-1"})

    assert response.url == url(study, "instructions/")
    participant = Participant.objects.get(study=study)
    assert (participant.recruitment_study_id, participant.recruitment_session_id) == ("st-1", "se-1")
    assert participant.state == State.INSTRUCTIONS
    assert 1 <= participant.place <= study.quota


def test_it_stores_only_a_keyed_hash_of_the_prolific_pid(client: Client) -> None:
    study = make_study()

    join(client, study, {"PROLIFIC_PID": "5f1a2b"})

    participant = Participant.objects.get(study=study)
    assert participant.recruitment_id_hash == recruitment_id_hash("5f1a2b")
    assert "5f1a2b" not in participant.recruitment_id_hash
    assert "5f1a2b" not in participant.token


def test_it_maps_the_same_prolific_pid_to_the_same_participant() -> None:
    study = make_study()

    join(Client(), study, {"PROLIFIC_PID": "5f1a2b"})
    response = Client().get(url(study), {"PROLIFIC_PID": "5f1a2b"})

    assert response.url == url(study, "instructions/")
    assert Participant.objects.filter(study=study).count() == 1


def test_it_gives_a_generated_id_to_a_participant_without_a_recruitment_id(client: Client) -> None:
    study = make_study()

    join(client, study)
    response = client.get(url(study))

    assert response.url == url(study, "instructions/")
    participant = Participant.objects.get(study=study)
    assert participant.recruitment_id_hash is None
    assert len(participant.token) == 32


def test_a_double_click_on_agree_makes_one_participant_with_one_place(client: Client) -> None:
    study = make_study()
    page = client.get(url(study), follow=True)
    enrolment = re.search(r'name="enrolment" value="([^"]+)"', page.content.decode()).group(1)

    first = client.post(url(study, "consent/"), {"decision": "agree", "enrolment": enrolment})
    second = Client().post(url(study, "consent/"), {"decision": "agree", "enrolment": enrolment})

    assert (first.url, second.url) == (url(study, "instructions/"), url(study, "instructions/"))
    assert Participant.objects.filter(study=study).count() == 1
    assert Participant.objects.get(study=study).place is not None


def test_it_refuses_a_consent_form_it_did_not_issue(client: Client) -> None:
    study = make_study()
    forged = make_participant(study).token

    for enrolment in ("", forged, "x" * 40):
        response = client.post(url(study, "consent/"), {"decision": "agree", "enrolment": enrolment})
        assert response.status_code == 400
        assert "open the study link again" in response.content.decode()
    assert Participant.objects.filter(study=study).count() == 1


def test_cookie_less_fetches_of_the_link_take_no_place_and_screen_no_one_out() -> None:
    study = make_study(quota=2)

    for _ in range(20):  # a link-preview bot, a prefetcher: no cookies kept, redirects followed
        assert Client().get(url(study), {"PROLIFIC_PID": "bot"}, follow=True).status_code == 200
        assert Client().get(url(study), follow=True).status_code == 200
    response = join(Client(), study, {"PROLIFIC_PID": "a-real-person"})

    assert response.url == url(study, "instructions/")
    assert list(Participant.objects.values_list("state", flat=True)) == [State.INSTRUCTIONS]


def test_it_screens_out_newcomers_who_consent_once_the_quota_is_full(client: Client) -> None:
    study = make_study(quota=1)
    undecided = make_participant(study, recruitment_id="undecided")  # holds no place
    join(Client(), study, {"PROLIFIC_PID": "first"})

    response = join(client, study, {"PROLIFIC_PID": "second"})

    states = dict(Participant.objects.values_list("recruitment_id_hash", "state"))
    assert states[recruitment_id_hash("first")] == State.INSTRUCTIONS
    assert states[recruitment_id_hash("second")] == State.SCREENED_OUT
    assert "FULL123" in client.get(response.url).content.decode()
    assert browser_of(undecided).post(url(study, "consent/"), {"decision": "agree"}).url == url(
        study, "done/"
    )


def test_a_place_given_back_goes_to_the_next_newcomer() -> None:
    study = make_study(quota=1)
    first = participant_at_elicitation(study, recruitment_id="first")
    participant_mark_returned(participant=first)

    response = join(Client(), study, {"PROLIFIC_PID": "next"})

    assert response.url == url(study, "instructions/")
    first.refresh_from_db()
    assert first.place is None
    assert Participant.objects.get(recruitment_id_hash=recruitment_id_hash("next")).place == 1


def test_it_turns_newcomers_away_from_a_closed_study(client: Client) -> None:
    study = make_study(is_open=False)

    response = client.get(url(study), {"PROLIFIC_PID": "5f1a2b"})

    assert "closed" in response.content.decode()
    assert not Participant.objects.filter(study=study).exists()


def test_it_redirects_a_request_for_another_step_to_the_current_one() -> None:
    participant = participant_at_elicitation(make_study())
    client = browser_of(participant)

    for path in ("consent/", "instructions/", "waiting/", "rate/1/", "survey/", "done/", "pick/3/"):
        response = client.get(url(participant.study, path))
        assert (path, response.status_code, response.url) == (path, 302, url(participant.study, "pick/1/"))


def test_it_redirects_the_back_button_to_the_next_pair() -> None:
    participant = participant_at_elicitation(make_study())
    client = browser_of(participant)
    post_pick(client, participant, 0)

    response = client.get(url(participant.study, "pick/1/"))

    assert response.url == url(participant.study, "pick/2/")


def test_it_shows_a_second_tab_the_same_step() -> None:
    participant = participant_at_elicitation(make_study())
    client = browser_of(participant)
    pick(participant, 0)

    response = client.get(url(participant.study))

    assert response.url == url(participant.study, "pick/2/")


def test_it_resumes_the_next_day_in_another_browser_with_the_same_prolific_pid() -> None:
    study = make_study()
    participant = participant_at_elicitation(study, recruitment_id="5f1a2b")
    pick(participant, 0)

    response = Client().get(url(study), {"PROLIFIC_PID": "5f1a2b"})

    assert response.url == url(study, "pick/2/")


def test_it_sends_a_browser_without_a_participant_to_the_entry_link(client: Client) -> None:
    participant = participant_at_elicitation(make_study())

    response = client.get(url(participant.study, "pick/1/"))

    assert response.url == url(participant.study)


def test_it_records_a_replayed_pick_once() -> None:
    participant = participant_at_elicitation(make_study())
    client = browser_of(participant)

    first = post_pick(client, participant, 0, "left")
    replay = post_pick(client, participant, 0, "right")

    assert (first.status_code, replay.status_code) == (302, 302)
    assert ElicitationPick.objects.filter(item__participant=participant).count() == 1
    assert ElicitationPick.objects.get(item__participant=participant).choice == "left"


def test_it_records_a_replayed_rating_once() -> None:
    participant = participant_rating(make_study())
    client = browser_of(participant)

    post_rating(client, participant, 0, choice="left")
    post_rating(client, participant, 0, choice="right")

    assert Rating.objects.filter(item__participant=participant).count() == 1
    participant.refresh_from_db()
    assert participant.ratings_done == 1


def test_it_rejects_a_pick_on_another_participants_pair() -> None:
    study = make_study()
    participant, other = participant_at_elicitation(study), participant_at_elicitation(study)
    client = browser_of(participant)

    response = post_pick(client, participant, 0, item_id=other.elicitation_items.get(position=0).pk)

    assert response.status_code == 400
    assert "not one of yours" in response.content.decode()
    assert not ElicitationPick.objects.exists()


def test_it_rejects_a_pick_on_a_later_pair_of_ones_own() -> None:
    participant = participant_at_elicitation(make_study())

    response = post_pick(
        browser_of(participant), participant, 0, item_id=participant.elicitation_items.get(position=2).pk
    )

    assert response.status_code == 400
    assert not ElicitationPick.objects.exists()


def test_it_rejects_a_choice_outside_the_allowed_values() -> None:
    participant = participant_at_elicitation(make_study())

    response = post_pick(browser_of(participant), participant, 0, choice="both")

    assert response.status_code == 400
    assert not ElicitationPick.objects.exists()
    participant.refresh_from_db()
    assert participant.picks_done == 0


def test_it_rejects_a_strength_outside_one_to_five() -> None:
    participant = participant_rating(make_study())

    response = post_rating(browser_of(participant), participant, 0, strength=9)

    assert response.status_code == 400
    assert not Rating.objects.exists()


def test_it_rejects_a_rating_of_another_participants_item() -> None:
    study = make_study()
    participant, other = participant_rating(study), participant_rating(study)
    item = other.rating_items.get(position=0)

    response = post_rating(browser_of(participant), participant, 0, item=item.pk)

    assert response.status_code == 400
    assert not Rating.objects.exists()


def test_it_never_shows_one_participant_another_participants_pairs() -> None:
    study = make_study()
    participant, other = participant_at_elicitation(study), participant_at_elicitation(study)

    page = browser_of(participant).get(url(study, "pick/1/")).content.decode()

    mine = participant.elicitation_items.get(position=0)
    theirs = other.elicitation_items.get(position=0)
    assert f'value="{mine.pk}"' in page
    assert f'value="{theirs.pk}"' not in page


def test_it_refuses_the_status_of_a_participant_this_browser_is_not(client: Client) -> None:
    study = make_study()
    participant_waiting(study)

    response = client.get(url(study, "status/"))

    assert response.status_code == 403


def test_it_reports_the_generation_status_as_json_for_polling() -> None:
    participant = participant_waiting(make_study())

    response = browser_of(participant).get(url(participant.study, "status/"))

    assert response.json() == {"state": "waiting", "generation": "queued", "delayed": False}


def test_it_has_the_waiting_page_poll_when_the_channel_layer_cannot_carry_the_workers_events(
    settings,
) -> None:
    # The in-memory layer (the embedded default) lives in the server's process: the worker's "ready" never
    # reaches a socket the server holds, so the page gets no socket to wait on.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    participant = participant_waiting(make_study())

    page = browser_of(participant).get(url(participant.study, "waiting/")).content.decode()

    assert 'data-socket-path=""' in page
    assert "/ws/participants/" not in page


def test_it_enqueues_personalization_only_when_the_last_pick_commits(
    django_capture_on_commit_callbacks,
) -> None:
    participant = participant_at_elicitation(make_study(n_pairs=2))
    client = browser_of(participant)

    with django_capture_on_commit_callbacks() as after_first:
        post_pick(client, participant, 0)
    with django_capture_on_commit_callbacks() as after_last:
        post_pick(client, participant, 1)

    # (The last pick also tells the study's dashboards; only the enqueue is checked here.)
    enqueued = [c for c in after_last if getattr(c, "func", None) is personalize_enqueue]
    assert after_first == []
    assert [callback.args for callback in enqueued] == [(participant.pk,)]


def test_it_records_server_side_timing_for_each_judgment() -> None:
    participant = participant_at_elicitation(make_study())
    client = browser_of(participant)

    client.get(url(participant.study, "pick/1/"))
    post_pick(client, participant, 0)

    item = participant.elicitation_items.get(position=0)
    assert item.shown_at is not None
    assert item.pick.answered_at >= item.shown_at
    assert item.pick.elapsed_ms == round((item.pick.answered_at - item.shown_at).total_seconds() * 1000)


def test_it_shows_the_blind_pair_without_naming_the_arm() -> None:
    participant = participant_rating(make_study())
    item = participant.rating_items.exclude(is_attention_check=True).order_by("position").first()
    participant.ratings_done = item.position
    participant.save()

    page = browser_of(participant).get(url(participant.study, f"rate/{item.position + 1}/")).content.decode()

    assert item.left.text in page and item.right.text in page
    for arm in participant.study.arms.all():
        assert not re.search(rf"\b{arm.name}\b", page, re.IGNORECASE)
        assert arm.checkpoint not in page


def test_it_deletes_a_participants_data_when_they_withdraw() -> None:
    participant = participant_rating(make_study())
    rate_all(participant)
    client = browser_of(participant)

    response = client.post(url(participant.study, "withdraw/"), follow=True)

    participant.refresh_from_db()
    assert participant.state == State.WITHDRAWN
    assert not ElicitationPick.objects.filter(item__participant=participant).exists()
    assert not GeneratedResponse.objects.filter(participant=participant).exists()
    assert not RatingItem.objects.filter(participant=participant).exists()
    assert not Rating.objects.filter(item__participant=participant).exists()
    assert "have been deleted" in response.content.decode()


def test_it_completes_the_study_with_the_completion_code_after_the_survey() -> None:
    participant = rate_all(participant_rating(make_study()))

    response = browser_of(participant).post(
        url(participant.study, "survey/"),
        {"self_description": "I like short answers.", "age_range": "25-34"},
        follow=True,
    )

    page = response.content.decode()
    assert "DONE123" in page
    assert "https://app.prolific.com/submissions/complete?cc=DONE123" in page
    assert SurveyResponse.objects.get(participant=participant).self_description == "I like short answers."


def test_it_gives_the_failed_attention_code_to_a_participant_who_failed_an_attention_check() -> None:
    participant = rate_all(participant_rating(make_study()), pass_attention_checks=False)

    response = browser_of(participant).post(url(participant.study, "survey/"), {}, follow=True)

    assert "ATTN123" in response.content.decode()
    assert "DONE123" not in response.content.decode()


def test_it_gives_the_declined_code_when_consent_is_declined() -> None:
    participant = make_participant(make_study())

    response = browser_of(participant).post(
        url(participant.study, "consent/"), {"decision": "decline"}, follow=True
    )

    participant.refresh_from_db()
    assert participant.state == State.DECLINED
    assert "NOPE123" in response.content.decode()


def test_it_walks_a_participant_through_consent_instructions_and_picks_to_the_waiting_page() -> None:
    participant = make_participant(make_study(n_pairs=2))
    client = browser_of(participant)
    study = participant.study

    client.post(url(study, "consent/"), {"decision": "agree"})
    client.post(url(study, "instructions/"))
    participant.refresh_from_db()
    for position in range(2):
        post_pick(client, participant, position, Side.RIGHT)
    response = client.get(url(study, "waiting/"))

    assert response.status_code == 200
    assert "Step 4 of 6" in response.content.decode()
    assert f"/ws/participants/{participant.token}/" in response.content.decode()


# ---------------------------------------------------------------------------------------------------
# Timed out and returned: the study has ended for them, whatever they ask for


def time_out(participant: Participant) -> Participant:
    """Make the participant inactive for one minute past their study's limit, then run the expiry."""
    limit = participant.study.time_limit_minutes
    Participant.objects.filter(pk=participant.pk).update(
        updated_at=timezone.now() - timedelta(minutes=limit + 1)
    )
    assert participants_expire(study=participant.study) == 1
    participant.refresh_from_db()
    return participant


def judgments_of(participant: Participant) -> tuple[int, int, int, int]:
    participant.refresh_from_db()
    return (
        ElicitationPick.objects.filter(item__participant=participant).count(),
        Rating.objects.filter(item__participant=participant).count(),
        SurveyResponse.objects.filter(participant=participant).count(),
        participant.picks_done + participant.ratings_done,
    )


def test_it_shows_a_timed_out_participant_who_comes_back_the_timed_out_page() -> None:
    study = make_study(time_limit_minutes=45)
    participant = participant_at_elicitation(study, recruitment_id="5f1a2b")
    pick(participant, 0)
    time_out(participant)

    own_browser = browser_of(participant).get(url(study, "pick/2/"), follow=True)
    entry_link = Client().get(url(study), {"PROLIFIC_PID": "5f1a2b"}, follow=True)

    for response in (own_browser, entry_link):
        assert response.redirect_chain[-1][0] == url(study, "done/")
        page = response.content.decode()
        assert "Your session has timed out" in page
        assert "time limit of 45 minutes" in page
        assert "contact the researchers" in page
        assert "DONE123" not in page and "Withdraw from the study" not in page


def test_it_records_nothing_that_a_timed_out_participant_posts() -> None:
    picking = participant_at_elicitation(make_study())
    pick(picking, 0)
    rating = participant_rating(make_study())
    surveying = rate_all(participant_rating(make_study()))
    posts = [
        (picking, "pick/2/", {"item": picking.elicitation_items.get(position=1).pk, "choice": "left"}),
        (picking, "pick/1/", {"item": picking.elicitation_items.get(position=0).pk, "choice": "right"}),
        (
            rating,
            "rate/1/",
            {"item": rating.rating_items.get(position=0).pk, "choice": "left", "strength": 4},
        ),
        (surveying, "survey/", {"self_description": "I like short answers."}),
        (picking, "withdraw/", {}),
        (picking, "consent/", {"decision": "decline"}),
    ]
    for participant in (picking, rating, surveying):
        time_out(participant)
    before = {p.pk: judgments_of(p) for p in (picking, rating, surveying)}

    responses = [(path, browser_of(p).post(url(p.study, path), data)) for p, path, data in posts]

    assert [(path, r.status_code, r.url) for path, r in responses] == [
        (path, 302, url(p.study, "done/")) for p, path, _ in posts
    ]
    assert {p.pk: judgments_of(p) for p in (picking, rating, surveying)} == before
    assert {p.state for p in (picking, rating, surveying)} == {State.TIMED_OUT}


def test_it_sends_a_timed_out_participants_waiting_page_to_the_timed_out_page() -> None:
    participant = time_out(participant_waiting(make_study()))
    client = browser_of(participant)

    status = client.get(url(participant.study, "status/")).json()
    waiting = client.get(url(participant.study, "waiting/"))

    assert status == {"state": "timed_out", "generation": "queued", "delayed": False}
    assert waiting.url == url(participant.study, "done/")


def test_it_gives_a_timed_out_participants_place_to_a_newcomer(client: Client) -> None:
    study = make_study(quota=1)
    time_out(participant_at_elicitation(study, recruitment_id="first"))

    join(client, study, {"PROLIFIC_PID": "second"})

    second = Participant.objects.get(recruitment_id_hash=recruitment_id_hash("second"))
    assert (second.state, second.place) == (State.INSTRUCTIONS, 1)


def test_it_tells_a_returned_participant_that_the_study_has_ended_for_them() -> None:
    participant = participant_at_elicitation(make_study())
    participant_mark_returned(participant=participant)

    response = browser_of(participant).post(
        url(participant.study, "pick/1/"),
        {"item": participant.elicitation_items.get(position=0).pk, "choice": "left"},
        follow=True,
    )

    assert "This study has ended for you" in response.content.decode()
    assert not ElicitationPick.objects.filter(item__participant=participant).exists()
