"""Changes to participants outside their judgments and their personalization: enrolment, consent (and
the quota place it takes), the start of the picks, withdrawal, and the ends set from outside the journey
(returned, timed out), which give the place back.

A participant row is locked (selectors.participant_for_update) by every change to it, so two tabs or a
double-click can never both move it; every change of state tells the participant's open pages and the
study's dashboards once the transaction commits."""

import random
from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from annotation.writers import elicitation_items_assign, participant_data_delete
from studyapp.models import Participant, Study
from studyapp.pseudonyms import recruitment_id_hash
from studyapp.realtime import notify_participant_changed_on_commit, notify_study_on_commit
from studyapp.selectors import participant_for_update, study_places_held, study_places_taken

State = Participant.State
Generation = Participant.Generation


def participant_locked(participant: Participant) -> Participant:
    """The participant's row again, locked until the end of the transaction
    (selectors.participant_for_update). A participant deleted meanwhile raises Participant.DoesNotExist."""
    locked = participant_for_update(participant_id=participant.pk)
    if locked is None:
        raise Participant.DoesNotExist(f"participant {participant.pk} no longer exists")
    return locked


class StudyClosed(Exception):
    """A newcomer tried to join a study that is not open."""


def participant_enroll(
    *,
    study: Study,
    recruitment_id: str | None = None,
    recruitment_study_id: str = "",
    recruitment_session_id: str = "",
    token: str | None = None,
) -> Participant:
    """The participant for this recruitment id (or this `token`), or a new one, at the consent step
    with no place yet: a place is taken only by consenting (participant_consent).

    The same recruitment id always gives back the same participant, whatever state they are in, and so
    does the same `token` (the consent page's, so a double-click makes one participant). A newcomer is
    refused with StudyClosed when the study is not open. Nothing is locked: two arrivals with the same id
    at once meet on the unique constraint, and the second gets the first's row."""
    id_hash = recruitment_id_hash(recruitment_id) if recruitment_id else None
    if existing := _participant_known(study, id_hash, token):
        return existing
    if not study.is_open:
        raise StudyClosed(study.slug)
    fields = {"token": token} if token else {}
    try:
        with transaction.atomic():
            participant = Participant.objects.create(
                study=study,
                recruitment_id_hash=id_hash,
                recruitment_study_id=recruitment_study_id[:64],
                recruitment_session_id=recruitment_session_id[:64],
                **fields,
            )
    except IntegrityError:
        if existing := _participant_known(study, id_hash, token):
            return existing
        raise
    notify_study_on_commit(study.pk)
    return participant


def _participant_known(study: Study, id_hash: str | None, token: str | None) -> Participant | None:
    """The study's participant with this recruitment id hash, else with this token."""
    participants = Participant.objects.select_related("study").filter(study=study)
    if id_hash is not None and (found := participants.filter(recruitment_id_hash=id_hash).first()):
        return found
    return participants.filter(token=token).first() if token else None


def participant_join(
    *,
    study: Study,
    agreed: bool,
    token: str,
    recruitment_id: str | None = None,
    recruitment_study_id: str = "",
    recruitment_session_id: str = "",
) -> Participant:
    """A newcomer's decision on the consent page: their participant (participant_enroll) and their
    consent (participant_consent), in one transaction."""
    with transaction.atomic():
        participant = participant_enroll(
            study=study,
            recruitment_id=recruitment_id,
            recruitment_study_id=recruitment_study_id,
            recruitment_session_id=recruitment_session_id,
            token=token,
        )
        return participant_consent(participant=participant, agreed=agreed)


def participant_consent(*, participant: Participant, agreed: bool) -> Participant:
    """Consent given (a quota place is taken, and on to the instructions; or, with every place taken,
    screened out) or declined (the study ends with the declined code). A replay once the participant has
    moved on changes nothing."""
    with transaction.atomic():
        participant = participant_locked(participant)
        if participant.state != State.CONSENT:
            return participant
        now = timezone.now()
        if not agreed:
            participant.state, participant.finished_at = State.DECLINED, now
        elif place_claim(participant):
            participant.state, participant.consented_at = State.INSTRUCTIONS, now
        else:
            participant.state, participant.finished_at = State.SCREENED_OUT, now
        participant.save(update_fields=["state", "consented_at", "finished_at", "place", "updated_at"])
        notify_study_on_commit(participant.study_id)
        return participant


def place_claim(participant: Participant) -> bool:
    """Give the (locked) participant a free quota place, a number in 1..quota no one in the study holds;
    False when every one is taken.

    Exact without a lock on the study: the numbers are unique per study (a constraint), so two arrivals
    that pick the same free number meet there and the second picks again. Each picks at random, so
    arrivals at once seldom meet: while at most half the places are held, a number drawn from 1..quota
    (one count, no list of the places); past that, from the free numbers themselves."""
    study = participant.study
    for _ in range(study.quota + PLACE_DRAWS):
        held = study_places_taken(study=study)
        if held >= study.quota:
            return False
        if 2 * held <= study.quota:
            number = random.randint(1, study.quota)
        else:
            number = random.choice(sorted(set(range(1, study.quota + 1)) - study_places_held(study=study)))
        try:
            with transaction.atomic():
                Participant.objects.filter(pk=participant.pk).update(place=number)
        except IntegrityError:
            continue  # held already, or someone took it meanwhile
        participant.place = number
        return True
    return False


# Draws from 1..quota that may meet a held place before place_claim gives up (beyond one per place).
PLACE_DRAWS = 64


def places_compact(*, study: Study) -> None:
    """After the quota is lowered: the places held above it move to free numbers within it, so that a
    newcomer is given a place only while fewer than `quota` are held (the places held stay held)."""
    for participant in Participant.objects.filter(study=study, place__gt=study.quota).order_by("place"):
        free = sorted(set(range(1, study.quota + 1)) - study_places_held(study=study))
        if not free:
            return
        with transaction.atomic():
            Participant.objects.filter(pk=participant.pk).update(place=free[0])


def participant_start_elicitation(*, participant: Participant) -> Participant:
    """The participant has read the instructions: assign their pairs (order and sides randomized and
    recorded) and start the picks."""
    with transaction.atomic():
        participant = participant_locked(participant)
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
    (personalization.responses_store checks the state). A participant who can no longer withdraw
    (Participant.may_withdraw: already gone, returned, timed out) is left as they are."""
    with transaction.atomic():
        participant = participant_locked(participant)
        if not participant.may_withdraw:
            return participant
        participant_data_delete(participant=participant)
        participant.state = State.WITHDRAWN
        participant.n_picks = participant.picks_done = participant.n_ratings = participant.ratings_done = 0
        participant.generation, participant.generation_error = Generation.NOT_STARTED, ""
        participant.finished_at, participant.place = timezone.now(), None
        participant.save()
        notify_participant_changed_on_commit(participant)
        return participant


def _finish_from_outside(participant: Participant, state: str, now: datetime) -> None:
    """End the participant's study without their say (returned, timed out): their judgments stay, flagged
    by the state for exclusion; their place is freed; their open pages move to the last page."""
    participant.state, participant.finished_at, participant.place = state, now, None
    participant.save(update_fields=["state", "finished_at", "place", "updated_at"])
    notify_participant_changed_on_commit(participant)


def participants_expire(*, now: datetime | None = None, study: Study | None = None) -> int:
    """Time out every participant (of `study`, or of every study) who has not finished and has done
    nothing (`updated_at`) for longer than their study's time limit; returns how many.

    A timed-out participant's pages change nothing any more, their judgments are kept but left out of
    the analyses, their place in the quota is freed, and a generation still running for them stores
    nothing. Safe to run at any time and as often as wanted (a beat task and `manage.py
    expire_participants` run it): each participant is checked again under its lock, so one who has just
    made a step is left alone."""
    now = now or timezone.now()
    studies = [study] if study is not None else Study.objects.order_by("pk")
    expired = 0
    for s in studies:
        cutoff = now - timedelta(minutes=s.time_limit_minutes)
        stale = Participant.objects.filter(study=s, updated_at__lt=cutoff).exclude(
            state__in=Participant.FINISHED_STATES
        )
        for participant_id in stale.values_list("pk", flat=True):
            with transaction.atomic():
                participant = participant_for_update(participant_id=participant_id)
                if participant is None or participant.is_finished or participant.updated_at >= cutoff:
                    continue
                _finish_from_outside(participant, State.TIMED_OUT, now)
                expired += 1
    return expired


def participant_mark_returned(*, participant: Participant) -> Participant:
    """A coordinator mirrors the recruitment platform's "returned submission": the participant's study
    ends (state returned), their place is freed, and their judgments are kept but left out of the
    analyses. Marking a returned participant again changes nothing; one who never held a place or has
    withdrawn (Participant.may_be_returned) is refused with ValidationError."""
    with transaction.atomic():
        participant = participant_locked(participant)
        if participant.state == State.RETURNED:
            return participant
        if not participant.may_be_returned:
            raise ValidationError(
                f"A participant who is {participant.get_state_display().lower()} cannot be marked returned."
            )
        _finish_from_outside(participant, State.RETURNED, timezone.now())
        return participant
