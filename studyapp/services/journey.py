"""The participant's judgments: their picks, their ratings and their survey.

Every judgment is recorded under a lock on its participant and only for the item the participant is on
(studyapp.flow), and is one-to-one with its item in the database, so a double-click or a replayed POST
records nothing twice. Recording returns False for such a replay; an item that is not the participant's,
or a value outside the allowed ones, raises ValidationError and changes nothing.
"""

from typing import Any, TypeVar

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Manager, QuerySet
from django.utils import timezone

from annotation.models import ElicitationItem, ElicitationPick, Rating, RatingItem, Side
from annotation.writers import elicitation_pick_create, item_mark_shown, rating_create, survey_create
from studyapp.flow import Step, participant_next_step
from studyapp.models import Participant
from studyapp.realtime import notify_study_on_commit

from .participants import participant_locked
from .personalization import participant_generation_queue

State = Participant.State
Item = TypeVar("Item", ElicitationItem, RatingItem)
REASON_MAX_LENGTH = 500
SURVEY_FIELDS = ("self_description", "age_range", "gender", "education", "occupation", "comments")

__all__ = [
    "REASON_MAX_LENGTH",
    "SURVEY_FIELDS",
    "elicitation_pick_record",
    "item_mark_shown",  # a page's first showing of an item (a row write, no change to the participant)
    "rating_record",
    "survey_record",
]


def _check_choice(choice: str) -> None:
    if choice not in Side.values:
        raise ValidationError("Choose Response A or Response B.")


def _item_to_judge(
    participant: Participant,
    items: QuerySet[Item],
    judgments: Manager[Any],
    item_id: int,
    step: str,
    noun: str,
) -> Item | None:
    """The participant's item `item_id` (among `items`), to be judged now; None when it has a judgment
    already (a replay). An item that is not theirs, or not the one they are on, raises ValidationError."""
    item = items.filter(pk=item_id).first()
    if item is None:
        raise ValidationError(f"This {noun} is not one of yours.")
    if judgments.filter(item=item).exists():
        return None
    if participant_next_step(participant) != Step(step, item.position):
        raise ValidationError(f"This {noun} is not the one to answer now.")
    return item


def elicitation_pick_record(*, participant: Participant, item_id: int, choice: str) -> bool:
    """Record the participant's pick on the pair they are on. The last pick moves them to the waiting
    page and enqueues `personalize` once the transaction commits."""
    _check_choice(choice)
    with transaction.atomic():
        participant = participant_locked(participant)
        items = ElicitationItem.objects.filter(participant=participant)
        item = _item_to_judge(participant, items, ElicitationPick.objects, item_id, "elicitation", "pair")
        if item is None:
            return False
        elicitation_pick_create(item=item, choice=choice)
        participant.picks_done += 1
        if participant.picks_done == participant.n_picks:
            participant.state = State.WAITING
            participant_generation_queue(participant)
            notify_study_on_commit(participant.study_id)
        participant.save(update_fields=["picks_done", "state", "generation", "updated_at"])
        return True


def _check_rating(choice: str, strength: int, reason: str) -> None:
    _check_choice(choice)
    if not isinstance(strength, int) or not 1 <= strength <= 5:
        raise ValidationError("Strength must be a whole number from 1 to 5.")
    if len(reason) > REASON_MAX_LENGTH:
        raise ValidationError(f"Please keep the reason under {REASON_MAX_LENGTH} characters.")


def rating_record(
    *, participant: Participant, item_id: int, choice: str, strength: int, reason: str = ""
) -> bool:
    """Record the participant's rating of the A/B item they are on: the side that suits them, how strongly
    (1-5), and an optional one-sentence reason. The last rating moves them to the survey."""
    reason = reason.strip()
    _check_rating(choice, strength, reason)
    with transaction.atomic():
        participant = participant_locked(participant)
        items = RatingItem.objects.filter(participant=participant)
        item = _item_to_judge(participant, items, Rating.objects, item_id, "rating", "comparison")
        if item is None:
            return False
        rating_create(item=item, choice=choice, strength=strength, reason=reason)
        participant.ratings_done += 1
        if participant.ratings_done == participant.n_ratings:
            participant.state = State.SURVEY
        participant.save(update_fields=["ratings_done", "state", "updated_at"])
        notify_study_on_commit(participant.study_id)
        return True


def survey_record(*, participant: Participant, answers: dict[str, Any]) -> bool:
    """Store the closing survey (every answer optional) and complete the study."""
    unknown = set(answers) - set(SURVEY_FIELDS)
    if unknown:
        raise ValidationError(f"Unknown survey fields: {', '.join(sorted(unknown))}.")
    with transaction.atomic():
        participant = participant_locked(participant)
        if participant.state != State.SURVEY:
            return False
        now = timezone.now()
        survey_create(participant=participant, answers=answers, submitted_at=now)
        participant.state, participant.finished_at = State.COMPLETED, now
        participant.save(update_fields=["state", "finished_at", "updated_at"])
        notify_study_on_commit(participant.study_id)
        return True
