"""Reads about studies and participants (writes are in services.py)."""

from dataclasses import dataclass
from typing import Any

from django.db.models import F

from annotation.models import Rating
from studyapp.models import Participant, Study

State = Participant.State


def participant_by_token(*, study_slug: str, token: str | None) -> Participant | None:
    """The study's participant with this token (with its study loaded), or None."""
    if not token:
        return None
    return Participant.objects.select_related("study").filter(study__slug=study_slug, token=token).first()


def participant_for_update(*, participant_id: int) -> Participant | None:
    """The participant (with its study), locked until the end of the current transaction: every change
    to a participant goes through this, so two tabs or a double-click never both move them."""
    return Participant.objects.select_for_update().select_related("study").filter(pk=participant_id).first()


def participant_status(*, participant: Participant) -> dict[str, Any]:
    """What the waiting page needs to know (the socket and the polling endpoint send exactly this).
    Never the generation error: that is for coordinators."""
    return {"state": participant.state, "generation": participant.generation}


def participant_status_by_token(*, token: str) -> dict[str, Any] | None:
    participant = Participant.objects.filter(token=token).only("state", "generation").first()
    return None if participant is None else participant_status(participant=participant)


def study_places_taken(*, study: Study) -> int:
    """Participants who are taking the study or have finished it (what the quota counts)."""
    gone = (State.WITHDRAWN, State.DECLINED, State.SCREENED_OUT)
    return Participant.objects.filter(study=study).exclude(state__in=gone).count()


def participant_attention_failures(*, participant: Participant) -> int:
    """Attention checks answered with the side they did not ask for."""
    checks = Rating.objects.filter(item__participant=participant, item__is_attention_check=True)
    return checks.exclude(choice=F("item__expected_choice")).count()


@dataclass(frozen=True)
class Outcome:
    """How a participant's study ended: `kind` picks the page's message; `code` (may be empty) and `url`
    (the recruitment platform's completion link with the code, or empty) are what they take back."""

    kind: str  # completed | failed_attention | screened_out | declined | withdrawn
    code: str
    url: str


def participant_outcome(*, participant: Participant) -> Outcome:
    study = participant.study
    if participant.state == State.COMPLETED:
        if participant_attention_failures(participant=participant) > study.attention_failures_allowed:
            kind, code = "failed_attention", study.failed_attention_code
        else:
            kind, code = "completed", study.completion_code
    elif participant.state == State.SCREENED_OUT:
        kind, code = "screened_out", study.screened_out_code
    elif participant.state == State.DECLINED:
        kind, code = "declined", study.declined_code
    elif participant.state == State.WITHDRAWN:
        kind, code = "withdrawn", ""
    else:
        raise ValueError(f"participant {participant.token} has not finished (state {participant.state})")
    url = study.completion_url.replace("{code}", code) if study.completion_url and code else ""
    return Outcome(kind, code, url)
