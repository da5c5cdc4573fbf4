from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from studyapp.models import Participant
from tests.factories import make_participant, make_study, participant_at_elicitation

pytestmark = pytest.mark.django_db
State = Participant.State


def inactive_for(participant: Participant, minutes: int) -> Participant:
    Participant.objects.filter(pk=participant.pk).update(
        updated_at=timezone.now() - timedelta(minutes=minutes)
    )
    return participant


def states(*participants: Participant) -> list[str]:
    return [Participant.objects.get(pk=p.pk).state for p in participants]


def test_expire_participants_times_out_the_stale_participants_of_every_study() -> None:
    study, other = make_study(time_limit_minutes=30), make_study(time_limit_minutes=90)
    stale = inactive_for(participant_at_elicitation(study), 45)
    active = inactive_for(participant_at_elicitation(study), 15)
    within_limit = inactive_for(make_participant(other), 45)
    stale_elsewhere = inactive_for(make_participant(other), 100)
    out = StringIO()

    call_command("expire_participants", stdout=out)

    assert out.getvalue() == "Timed out 2 participants.\n"
    assert states(stale, active, within_limit, stale_elsewhere) == [
        State.TIMED_OUT,
        State.ELICITATION,
        State.CONSENT,
        State.TIMED_OUT,
    ]


def test_expire_participants_can_keep_to_one_study() -> None:
    study, other = make_study(time_limit_minutes=30), make_study(time_limit_minutes=30)
    mine, theirs = inactive_for(make_participant(study), 45), inactive_for(make_participant(other), 45)
    out = StringIO()

    call_command("expire_participants", "--study", study.slug, stdout=out)

    assert out.getvalue() == "Timed out 1 participant.\n"
    assert states(mine, theirs) == [State.TIMED_OUT, State.CONSENT]


def test_expire_participants_names_a_study_that_does_not_exist() -> None:
    with pytest.raises(CommandError, match="There is no study 'nope'."):
        call_command("expire_participants", "--study", "nope")
