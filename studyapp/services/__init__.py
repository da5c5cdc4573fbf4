"""Writes, named <entity>_<action> with keyword-only arguments. Each runs in one transaction and fires its
side effects (task enqueue, socket event) with transaction.on_commit.

- participants.py: enrolment, consent, the journey's state changes, withdrawal, generation status (and a
  coordinator's retry), and the ends set from outside the journey (returned, timed out);
- studies.py: creating and editing studies (settings, arms, comparisons, question pool);
- jobs.py: coordinators' background jobs and their progress.

Judgments (picks, ratings, survey), the question pool's rows and the storing of generated responses are
in annotation/services.py.
"""

from .jobs import (
    job_fail,
    job_launch,
    job_log_append,
    job_progress_record,
    job_start,
    job_succeed,
)
from .participants import (
    StudyClosed,
    participant_consent,
    participant_enroll,
    participant_generation_fail,
    participant_generation_retry,
    participant_generation_start,
    participant_mark_returned,
    participant_start_elicitation,
    participant_withdraw,
    participants_expire,
    recruitment_id_hash,
)
from .studies import STUDY_FIELDS, ArmSpec, study_create, study_update

__all__ = [
    "STUDY_FIELDS",
    "ArmSpec",
    "StudyClosed",
    "job_fail",
    "job_launch",
    "job_log_append",
    "job_progress_record",
    "job_start",
    "job_succeed",
    "participant_consent",
    "participant_enroll",
    "participant_generation_fail",
    "participant_generation_retry",
    "participant_generation_start",
    "participant_mark_returned",
    "participant_start_elicitation",
    "participant_withdraw",
    "participants_expire",
    "recruitment_id_hash",
    "study_create",
    "study_update",
]
