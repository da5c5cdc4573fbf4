import hashlib
import hmac

import pytest

from studyapp.models import Participant
from studyapp.services import participant_consent, recruitment_id_hash
from tests.factories import make_participant, make_study


def test_it_hashes_recruitment_ids_with_the_participant_id_key(settings) -> None:
    settings.PARTICIPANT_ID_KEY = "key-one"
    under_one = recruitment_id_hash("5f1a2b")
    settings.PARTICIPANT_ID_KEY = "key-two"

    assert under_one == hmac.new(b"key-one", b"5f1a2b", hashlib.sha256).hexdigest()
    assert recruitment_id_hash("5f1a2b") != under_one


@pytest.mark.django_db
def test_it_ignores_a_replayed_consent_once_the_participant_has_moved_on() -> None:
    participant = make_participant(make_study())
    participant_consent(participant=participant, agreed=True)

    participant_consent(participant=participant, agreed=False)

    participant.refresh_from_db()
    assert participant.state == Participant.State.INSTRUCTIONS
