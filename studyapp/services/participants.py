"""Changes to participants. A participant row is locked (selectors.participant_for_update) by every
change to it, so two tabs or a double-click can never both move it; every change of state tells the
participant's open pages and the study's dashboards once the transaction commits."""

import hashlib
import hmac
import random

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from annotation.models import ElicitationItem, GeneratedResponse, RatingItem, SurveyResponse
from annotation.services import elicitation_items_assign
from studyapp.models import Participant, Study
from studyapp.realtime import notify_participant_on_commit, notify_study_on_commit
from studyapp.selectors import participant_for_update, participant_status, study_places_taken

State = Participant.State
Generation = Participant.Generation


class StudyClosed(Exception):
    """A newcomer tried to join a study that is not open."""


def recruitment_id_hash(recruitment_id: str) -> str:
    """The keyed hash (HMAC-SHA256 under settings.PARTICIPANT_ID_KEY) stored instead of a recruitment id."""
    key = settings.PARTICIPANT_ID_KEY.encode()
    return hmac.new(key, recruitment_id.strip().encode(), hashlib.sha256).hexdigest()


def participant_enroll(
    *,
    study: Study,
    recruitment_id: str | None = None,
    recruitment_study_id: str = "",
    recruitment_session_id: str = "",
) -> Participant:
    """The participant for this recruitment id, or a new one (a generated pseudonym when there is no id).

    The same recruitment id always gives back the same participant, whatever state they are in. A
    newcomer is refused with StudyClosed when the study is not open, and is screened out (a participant in
    state screened_out, who gets that code) when the quota is full."""
    with transaction.atomic():
        # Serialises enrolments in the study: the quota count and the one-row-per-id check stay true.
        study = Study.objects.select_for_update().get(pk=study.pk)
        id_hash = recruitment_id_hash(recruitment_id) if recruitment_id else None
        if id_hash is not None:
            existing = Participant.objects.select_related("study").filter(
                study=study, recruitment_id_hash=id_hash
            )
            if participant := existing.first():
                return participant
        if not study.is_open:
            raise StudyClosed(study.slug)
        full = study_places_taken(study=study) >= study.quota
        notify_study_on_commit(study.pk)
        return Participant.objects.create(
            study=study,
            recruitment_id_hash=id_hash,
            recruitment_study_id=recruitment_study_id[:64],
            recruitment_session_id=recruitment_session_id[:64],
            state=State.SCREENED_OUT if full else State.CONSENT,
            finished_at=timezone.now() if full else None,
        )


def participant_consent(*, participant: Participant, agreed: bool) -> Participant:
    """Consent given (on to the instructions) or declined (the study ends with the declined code).
    A replay once the participant has moved on changes nothing."""
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant.pk)
        if participant.state != State.CONSENT:
            return participant
        now = timezone.now()
        if agreed:
            participant.state, participant.consented_at = State.INSTRUCTIONS, now
        else:
            participant.state, participant.finished_at = State.DECLINED, now
        participant.save(update_fields=["state", "consented_at", "finished_at", "updated_at"])
        notify_study_on_commit(participant.study_id)
        return participant


def participant_start_elicitation(*, participant: Participant) -> Participant:
    """The participant has read the instructions: assign their pairs (order and sides randomized and
    recorded) and start the picks."""
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant.pk)
        if participant.state != State.INSTRUCTIONS:
            return participant
        n = elicitation_items_assign(participant=participant, rng=random.Random(f"{participant.token}:pairs"))
        if n == 0:
            raise ValidationError(
                "This study has no pairs to choose between yet. Please contact the researchers."
            )
        participant.state, participant.n_picks, participant.picks_done = State.ELICITATION, n, 0
        participant.save(update_fields=["state", "n_picks", "picks_done", "updated_at"])
        notify_study_on_commit(participant.study_id)
        return participant


def participant_withdraw(*, participant: Participant) -> Participant:
    """Withdraw the participant and delete their data: picks, generated responses, ratings, survey.

    What remains is the row itself (state withdrawn, no judgments), so the same recruitment id comes back
    to "you have withdrawn" instead of starting again. A generation still running for them stores nothing
    (annotation.services.responses_store checks the state)."""
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant.pk)
        if participant.state in (State.WITHDRAWN, State.DECLINED, State.SCREENED_OUT):
            return participant
        RatingItem.objects.filter(participant=participant).delete()
        GeneratedResponse.objects.filter(participant=participant).delete()
        ElicitationItem.objects.filter(participant=participant).delete()
        SurveyResponse.objects.filter(participant=participant).delete()
        participant.state = State.WITHDRAWN
        participant.n_picks = participant.picks_done = participant.n_ratings = participant.ratings_done = 0
        participant.generation, participant.generation_error = Generation.NOT_STARTED, ""
        participant.finished_at = timezone.now()
        participant.save()
        notify_participant_on_commit(participant.token, participant_status(participant=participant))
        notify_study_on_commit(participant.study_id)
        return participant


def participant_generation_start(*, participant_id: int) -> bool:
    """A worker has started on the participant's responses; False when there is nothing to do for them
    (gone, withdrawn, or their responses are already stored)."""
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant_id)
        if (
            participant is None
            or participant.state != State.WAITING
            or participant.generation == Generation.READY
        ):
            return False
        participant.generation = Generation.RUNNING
        participant.save(update_fields=["generation", "updated_at"])
        notify_participant_on_commit(participant.token, participant_status(participant=participant))
        notify_study_on_commit(participant.study_id)
        return True


def participant_generation_fail(*, participant_id: int, error: str) -> None:
    """Generation failed for good: the participant's page says so, and coordinators see `error`."""
    with transaction.atomic():
        participant = participant_for_update(participant_id=participant_id)
        if (
            participant is None
            or participant.state != State.WAITING
            or participant.generation == Generation.READY
        ):
            return
        participant.generation, participant.generation_error = Generation.FAILED, error
        participant.save(update_fields=["generation", "generation_error", "updated_at"])
        notify_participant_on_commit(participant.token, participant_status(participant=participant))
        notify_study_on_commit(participant.study_id)
