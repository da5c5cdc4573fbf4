import asyncio
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import redis
from asgiref.sync import sync_to_async
from channels_redis.core import RedisChannelLayer
from django.utils import timezone

from annotation.models import GeneratedResponse, Question, RatingItem
from annotation.selectors import evaluation_questions_for
from studyapp.models import Arm, Participant, Study
from studyapp.realtime import participant_group
from studyapp.services import generations_recover
from tests.conftest import RunningWorker, tasks_sent_through, unreachable_broker_app
from tests.factories import (
    make_coordinator,
    make_study,
    participant_at_elicitation,
    participant_waiting,
    pick,
)
from tests.support import browser_of, coordinator_browser, run_async
from worker.tasks import personalize

# The worker is another process: it sees only committed rows.
pytestmark = pytest.mark.django_db(transaction=True)
State, Generation = Participant.State, Participant.Generation


def wait_for(
    worker: RunningWorker, participant: Participant, done: Callable[[Participant], bool], timeout: float = 120
) -> Participant:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        participant.refresh_from_db()
        if done(participant):
            return participant
        time.sleep(0.2)
    raise AssertionError(
        f"participant still {participant.state}/{participant.generation}\n--- worker log ---\n{worker.log_tail()}"
    )


async def updates_until_ready(layer: RedisChannelLayer, channel: str, worker: RunningWorker) -> list[dict]:
    """What a participant's page hears on `channel`, up to and including the `ready` update."""
    updates: list[dict] = []
    while not updates or updates[-1]["generation"] != Generation.READY:
        try:
            event = await asyncio.wait_for(layer.receive(channel), timeout=120)
        except (TimeoutError, redis.exceptions.TimeoutError):
            raise AssertionError(f"got {updates}\n{worker.log_tail()}") from None
        updates.append(event["payload"])
    return updates


def test_it_personalizes_a_participant_after_their_last_pick_with_a_real_model(
    tasks_go_to_the_worker: RunningWorker, tiny_checkpoint
) -> None:
    study = make_study(checkpoint=str(tiny_checkpoint))
    participant = participant_at_elicitation(study)
    browser = browser_of(participant)
    for position in range(participant.n_picks):
        item = participant.elicitation_items.get(position=position)
        browser.post(f"/s/{study.slug}/pick/{position + 1}/", {"item": item.pk, "choice": "left"})

    participant = wait_for(tasks_go_to_the_worker, participant, lambda p: p.state != State.WAITING)

    assert (participant.state, participant.generation) == (State.RATING, Generation.READY)
    responses = GeneratedResponse.objects.filter(participant=participant)
    assert responses.count() == 2 * 2  # arms x evaluation questions
    assert all(r.new_tokens > 0 for r in responses)
    # FSPO's prompt holds the participant's picks as shots; the no-context arm's does not.
    fspo, base = (responses.filter(arm__name=name).order_by("question_id") for name in ("fspo", "base"))
    assert all(f.prompt_tokens > b.prompt_tokens for f, b in zip(fspo, base, strict=True))
    assert RatingItem.objects.filter(participant=participant).count() == participant.n_ratings == 4
    assert browser.get(f"/s/{study.slug}/waiting/").url == f"/s/{study.slug}/rate/1/"


def test_it_tells_the_participants_group_when_their_responses_are_ready(
    tasks_go_to_the_worker: RunningWorker, tiny_checkpoint
) -> None:
    participant = participant_at_elicitation(make_study(checkpoint=str(tiny_checkpoint)))
    for position in range(participant.n_picks - 1):
        pick(participant, position)
    layer = RedisChannelLayer(hosts=[tasks_go_to_the_worker.redis_url])

    async def watch() -> list[dict]:
        channel = await layer.new_channel()
        await layer.group_add(participant_group(participant.token), channel)
        await sync_to_async(pick)(participant, participant.n_picks - 1)
        return await updates_until_ready(layer, channel, tasks_go_to_the_worker)

    updates = run_async(watch())

    assert updates == [
        {"state": "waiting", "generation": "running", "delayed": False},
        {"state": "rating", "generation": "ready", "delayed": False},
    ]


def test_it_does_nothing_for_a_participant_whose_responses_are_stored(
    tasks_go_to_the_worker: RunningWorker, tiny_checkpoint
) -> None:
    participant = participant_waiting(make_study(checkpoint=str(tiny_checkpoint)))
    wait_for(tasks_go_to_the_worker, participant, lambda p: p.state == State.RATING)
    items = list(RatingItem.objects.filter(participant=participant).values_list("pk", "left_id", "right_id"))

    result = tasks_go_to_the_worker.app.send_task(personalize.name, args=[participant.pk]).get(timeout=60)

    assert result == {"participant_id": participant.pk, "stored": 0, "skipped": True}
    assert GeneratedResponse.objects.filter(participant=participant).count() == 4
    assert (
        list(RatingItem.objects.filter(participant=participant).values_list("pk", "left_id", "right_id"))
        == items
    )


def test_it_tells_the_participant_when_generation_fails_for_good(
    tasks_go_to_the_worker: RunningWorker,
) -> None:
    participant = participant_waiting(make_study(checkpoint="/nonexistent/checkpoint"))

    participant = wait_for(tasks_go_to_the_worker, participant, lambda p: p.generation == Generation.FAILED)

    assert participant.state == State.WAITING
    assert "/nonexistent/checkpoint" in participant.generation_error  # for the coordinator
    page = browser_of(participant).get(f"/s/{participant.study.slug}/waiting/").content.decode()
    assert "We could not prepare your answers" in page
    assert "/nonexistent/checkpoint" not in page


def test_a_coordinators_retry_after_a_failure_generates_the_responses_once(
    tasks_go_to_the_worker: RunningWorker, tiny_checkpoint, settings
) -> None:
    # The site and the worker share one channel layer, as in production: the page hears both. (Reads
    # may wait longer than redis-py's default 5 s: the worker loads the model between two events.)
    hosts = [{"address": tasks_go_to_the_worker.redis_url, "socket_timeout": 60}]
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": hosts}}
    }
    study = make_study(checkpoint="/nonexistent/checkpoint")
    participant = participant_waiting(study)
    wait_for(tasks_go_to_the_worker, participant, lambda p: p.generation == Generation.FAILED)
    # The coordinator fixes the cause (the arms had no model), then retries from the dashboard.
    Arm.objects.filter(study=study).update(checkpoint=str(tiny_checkpoint))
    coordinator = coordinator_browser(make_coordinator())
    retry = f"/studio/studies/{study.slug}/participants/{participant.token}/retry-generation/"
    layer = RedisChannelLayer(hosts=hosts)

    async def retry_twice_and_watch() -> list[dict]:
        channel = await layer.new_channel()
        await layer.group_add(participant_group(participant.token), channel)
        for _ in range(2):  # a double click
            await sync_to_async(coordinator.post)(retry)
        return await updates_until_ready(layer, channel, tasks_go_to_the_worker)

    updates = run_async(retry_twice_and_watch())

    # What the participant's waiting page hears: waiting again, then on to the ratings.
    assert updates == [
        {"state": "waiting", "generation": "queued", "delayed": False},
        {"state": "waiting", "generation": "running", "delayed": False},
        {"state": "rating", "generation": "ready", "delayed": False},
    ]
    participant.refresh_from_db()
    assert (participant.state, participant.generation_error) == (State.RATING, "")
    assert GeneratedResponse.objects.filter(participant=participant).count() == 2 * 2
    assert RatingItem.objects.filter(participant=participant).count() == participant.n_ratings == 4
    assert browser_of(participant).get(f"/s/{study.slug}/waiting/").url == f"/s/{study.slug}/rate/1/"


def picked_while_the_broker_was_down(study: Study) -> Participant:
    """A participant of `study` whose picks, the last one included, were made while the broker refused
    every connection."""
    participant = participant_at_elicitation(study)
    with tasks_sent_through(unreachable_broker_app()):
        for position in range(participant.n_picks):
            pick(participant, position)
    participant.refresh_from_db()
    return participant


def test_a_pick_made_while_the_broker_was_down_is_sent_by_the_sweeper_once_it_is_back(
    tasks_go_to_the_worker: RunningWorker, tiny_checkpoint
) -> None:
    study = make_study(checkpoint=str(tiny_checkpoint))
    participant = picked_while_the_broker_was_down(study)
    # Not failed, not lost: queued, not sent, and their page says it is delayed.
    assert (participant.state, participant.generation) == (State.WAITING, Generation.QUEUED)
    assert participant.generation_sent_at is None
    assert participant.generation_error.startswith(Participant.NOT_SENT)
    status = browser_of(participant).get(f"/s/{study.slug}/status/").json()
    assert status == {"state": "waiting", "generation": "queued", "delayed": True}

    # The broker is back: the sweeper's next run (beat's, a few seconds on) sends it, once.
    later = timezone.now() + timedelta(seconds=10)
    assert generations_recover(now=later) == {"requeued": 0, "sent": 1}
    assert generations_recover(now=later) == {"requeued": 0, "sent": 0}

    participant = wait_for(tasks_go_to_the_worker, participant, lambda p: p.state == State.RATING)
    assert (participant.generation, participant.generation_error) == (Generation.READY, "")
    assert GeneratedResponse.objects.filter(participant=participant).count() == 2 * 2


def test_a_coordinator_can_retry_a_generation_the_broker_never_took(
    tasks_go_to_the_worker: RunningWorker, tiny_checkpoint
) -> None:
    study = make_study(checkpoint=str(tiny_checkpoint))
    participant = picked_while_the_broker_was_down(study)
    assert participant.may_retry_generation

    coordinator = coordinator_browser(make_coordinator())
    coordinator.post(f"/studio/studies/{study.slug}/participants/{participant.token}/retry-generation/")

    participant = wait_for(tasks_go_to_the_worker, participant, lambda p: p.state == State.RATING)
    assert (participant.generation, participant.generation_error) == (Generation.READY, "")
    assert GeneratedResponse.objects.filter(participant=participant).count() == 2 * 2


def last_pick_unsent(participant: Participant) -> None:
    """Their last pick, made while the broker refused every connection: queued, their own task not sent
    (so nothing but the worker touches their row until the sweeper's next run)."""
    with tasks_sent_through(unreachable_broker_app()):
        pick(participant, participant.n_picks - 1)


def one_pick_short(study: Study) -> Participant:
    participant = participant_at_elicitation(study)
    for position in range(participant.n_picks - 1):
        pick(participant, position)
    return participant


def waiting_with_others(study: Study, others: int) -> tuple[Participant, list[Participant]]:
    """A participant whose last pick sends their task, and `others` of the study who are already
    waiting, queued, when it starts."""
    waiting = [one_pick_short(study) for _ in range(others)]
    for participant in waiting:
        last_pick_unsent(participant)
    return participant_waiting(study), waiting


def test_participants_waiting_at_once_are_generated_in_one_batch_each_once(
    tasks_go_to_the_worker: RunningWorker, tiny_checkpoint
) -> None:
    study = make_study(checkpoint=str(tiny_checkpoint))
    lead, others = waiting_with_others(study, 2)

    for participant in (lead, *others):
        wait_for(tasks_go_to_the_worker, participant, lambda p: p.state == State.RATING)

    log = tasks_go_to_the_worker.log.read_text()
    # The lead's task took the two others, and both arms (one checkpoint) went in one model call.
    assert f"personalize({lead.pk}): generating {[p.pk for p in others]} with it, in one batch" in log
    assert (
        f"personalize batch: participants {sorted([lead.pk, *(p.pk for p in others)])}, 1 generation call(s)"
        in log
    )
    for participant in (lead, *others):
        assert (participant.generation, participant.generation_error) == (Generation.READY, "")
        responses = GeneratedResponse.objects.filter(participant=participant)
        assert responses.count() == 2 * 2  # arms x evaluation questions, stored once
        assert all(r.new_tokens > 0 for r in responses)
        assert RatingItem.objects.filter(participant=participant).count() == participant.n_ratings == 4
    # Their own tasks, never sent, are not sent now: there is nothing left to do for them.
    assert generations_recover(now=timezone.now() + timedelta(seconds=10)) == {"requeued": 0, "sent": 0}


def test_a_failed_batch_leaves_nobody_waiting_and_stores_nothing(
    tasks_go_to_the_worker: RunningWorker,
) -> None:
    lead, (claimed,) = waiting_with_others(make_study(checkpoint="/nonexistent/checkpoint"), 1)

    for participant in (lead, claimed):
        participant = wait_for(
            tasks_go_to_the_worker, participant, lambda p: p.generation == Generation.FAILED
        )
        assert participant.state == State.WAITING
        assert "/nonexistent/checkpoint" in participant.generation_error
        assert not GeneratedResponse.objects.filter(participant=participant).exists()
    log = tasks_go_to_the_worker.log.read_text()
    assert f"personalize({lead.pk}): generating [{claimed.pk}] with it, in one batch" in log


def test_one_participants_failure_in_a_batch_is_never_the_others(
    tasks_go_to_the_worker: RunningWorker, tiny_checkpoint
) -> None:
    # One of the study's two evaluation questions is too long for the model's context (2,048 positions):
    # a participant asked it cannot be generated; one asked the other can.
    study = make_study(checkpoint=str(tiny_checkpoint), n_eval_questions=1)
    too_long = Question.objects.filter(study=study, use=Question.Use.EVALUATION).first()
    assert too_long is not None
    too_long.text = "Which answer do you prefer, said user seven? " * 400
    too_long.save()
    asked: dict[bool, list[Participant]] = {True: [], False: []}
    while not (asked[True] and len(asked[False]) >= 2):
        participant = one_pick_short(study)
        asked[evaluation_questions_for(participant=participant)[0].pk == too_long.pk].append(participant)
    bad, good = asked[True][0], asked[False][:2]
    for participant in good:
        last_pick_unsent(participant)
    pick(bad, bad.n_picks - 1)  # their task starts the batch and takes the two others

    for participant in good:
        wait_for(tasks_go_to_the_worker, participant, lambda p: p.state == State.RATING)
    bad = wait_for(tasks_go_to_the_worker, bad, lambda p: p.generation == Generation.FAILED)

    log = tasks_go_to_the_worker.log.read_text()
    assert f"personalize({bad.pk}): generating {[p.pk for p in good]} with it, in one batch" in log
    assert "exceeds the model's context" in bad.generation_error
    assert not GeneratedResponse.objects.filter(participant=bad).exists()
    for participant in good:  # queued again on their own after the batch failed, then generated once
        assert (participant.generation, participant.generation_error) == (Generation.READY, "")
        assert GeneratedResponse.objects.filter(participant=participant).count() == 2 * 1
