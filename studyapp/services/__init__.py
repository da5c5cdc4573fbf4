"""Writes, named <entity>_<action> with keyword-only arguments. Each runs in one transaction and fires its
side effects (task enqueue, socket event) with transaction.on_commit.

Every change to a participant is made here, and `Participant.state` and `.generation` are written
nowhere else (tests/test_layering.py checks it). Each change has the same shape: lock the participant
(selectors.participant_for_update), check the step (studyapp.flow), write the rows (annotation.writers),
change the state, notify on commit (studyapp.realtime).

- participants.py: enrolment, consent, the start of the picks, withdrawal, and the ends set from outside
  the journey (returned, timed out);
- journey.py: the judgments: picks, ratings, survey;
- personalization.py: the generation of a participant's responses: enqueued on commit (studyapp.queue),
  started, kept alive by heartbeats, recovered when its worker or its broker failed (generations_recover),
  failed, retried by a coordinator, stored with the A/B items;
- studies.py: creating and editing studies (settings, arms, comparisons, question pool);
- jobs.py: coordinators' background jobs, their progress and heartbeats, and their recovery when their
  worker was lost (jobs_recover).
"""

from .jobs import (
    job_enqueue,
    job_fail,
    job_heartbeat,
    job_launch,
    job_log_append,
    job_progress_record,
    job_start,
    job_succeed,
    jobs_recover,
)
from .journey import (
    REASON_MAX_LENGTH,
    SURVEY_FIELDS,
    elicitation_pick_record,
    item_mark_shown,
    rating_record,
    survey_record,
)
from .participants import (
    StudyClosed,
    participant_consent,
    participant_enroll,
    participant_join,
    participant_mark_returned,
    participant_start_elicitation,
    participant_withdraw,
    participants_expire,
    recruitment_id_hash,
)
from .personalization import (
    NewResponse,
    generations_recover,
    participant_generation_fail,
    participant_generation_queue,
    participant_generation_requeue,
    participant_generation_retry,
    participant_generation_retry_later,
    participant_generation_sent,
    participant_generation_start,
    participant_generations_claim,
    participant_generations_heartbeat,
    personalize_enqueue,
    responses_store,
)
from .studies import STUDY_FIELDS, ArmSpec, study_create, study_update

__all__ = [
    "REASON_MAX_LENGTH",
    "STUDY_FIELDS",
    "SURVEY_FIELDS",
    "ArmSpec",
    "NewResponse",
    "StudyClosed",
    "elicitation_pick_record",
    "generations_recover",
    "item_mark_shown",
    "job_enqueue",
    "job_fail",
    "job_heartbeat",
    "job_launch",
    "job_log_append",
    "job_progress_record",
    "job_start",
    "job_succeed",
    "jobs_recover",
    "participant_consent",
    "participant_enroll",
    "participant_join",
    "participant_generation_fail",
    "participant_generation_queue",
    "participant_generation_requeue",
    "participant_generation_retry",
    "participant_generation_retry_later",
    "participant_generation_sent",
    "participant_generation_start",
    "participant_generations_claim",
    "participant_generations_heartbeat",
    "participant_mark_returned",
    "participant_start_elicitation",
    "participant_withdraw",
    "participants_expire",
    "personalize_enqueue",
    "rating_record",
    "recruitment_id_hash",
    "responses_store",
    "study_create",
    "study_update",
    "survey_record",
]
