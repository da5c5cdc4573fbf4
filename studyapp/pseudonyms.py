"""Pseudonyms: the keyed hash that stands in for a recruitment id (the participant's own token is random,
studyapp.models.new_participant_token)."""

import hashlib
import hmac

from django.conf import settings


def recruitment_id_hash(recruitment_id: str) -> str:
    """The keyed hash (HMAC-SHA256 under settings.PARTICIPANT_ID_KEY) stored instead of a recruitment id."""
    key = settings.PARTICIPANT_ID_KEY.encode()
    return hmac.new(key, recruitment_id.strip().encode(), hashlib.sha256).hexdigest()
