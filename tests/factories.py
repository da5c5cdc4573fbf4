"""Rows for tests: a small study with its pool and arms, and participants at any step of the journey
(brought there through the real services, so their rows are what the site would have written)."""

import itertools
from typing import Any

from django.contrib.auth.models import User

from annotation.models import CandidatePair, Question, Side
from annotation.selectors import evaluation_questions_for
from annotation.services import NewResponse, elicitation_pick_record, rating_record, responses_store
from studyapp.models import Arm, Comparison, Job, Participant, Study
from studyapp.services import participant_consent, participant_enroll, participant_start_elicitation

_serial = itertools.count(1)


def make_study(
    *, n_pairs: int = 3, n_eval_questions: int = 2, checkpoint: str = "/nonexistent/model", **fields: object
) -> Study:
    """An open study with a pool of n_pairs + 1 elicitation pairs and n_eval_questions + 1 evaluation
    questions, and two arms (FSPO against a no-context baseline) compared once per question."""
    n = next(_serial)
    defaults: dict[str, object] = {
        "slug": f"study-{n}",
        "title": f"Study {n}",
        "domain": "reviews",
        "instruction": "Answer the question the way this user prefers.",
        "n_pairs": n_pairs,
        "n_eval_questions": n_eval_questions,
        "consistency_repeats": 1,
        "attention_checks": 1,
        "quota": 10,
        "consent_text": "You agree to take part.",
        "completion_code": "DONE123",
        "screened_out_code": "FULL123",
        "failed_attention_code": "ATTN123",
        "declined_code": "NOPE123",
        "completion_url": "https://app.prolific.com/submissions/complete?cc={code}",
        "max_new_tokens": 8,
        "is_open": True,
    }
    study = Study.objects.create(**{**defaults, **fields})
    for i in range(n_pairs + 1):
        q = Question.objects.create(
            study=study, use=Question.Use.ELICITATION, text=f"Elicitation question {i}?"
        )
        CandidatePair.objects.create(
            question=q, response_a=f"Short answer {i}.", response_b=f"A long answer {i}."
        )
    for i in range(n_eval_questions + 1):
        Question.objects.create(study=study, use=Question.Use.EVALUATION, text=f"Evaluation question {i}?")
    fspo = Arm.objects.create(study=study, name="fspo", method=Arm.Method.FSPO, checkpoint=checkpoint)
    base = Arm.objects.create(study=study, name="base", method=Arm.Method.NO_CONTEXT, checkpoint=checkpoint)
    Comparison.objects.create(study=study, arm=fspo, baseline=base)
    return study


def make_participant(study: Study, *, recruitment_id: str | None = None) -> Participant:
    """A participant who has just arrived (on the consent page)."""
    return participant_enroll(study=study, recruitment_id=recruitment_id)


def participant_at_elicitation(study: Study, **kwargs: object) -> Participant:
    participant = make_participant(study, **kwargs)  # type: ignore[arg-type]
    participant_consent(participant=participant, agreed=True)
    return participant_start_elicitation(participant=participant)


def pick(participant: Participant, position: int, choice: str = Side.LEFT) -> bool:
    item = participant.elicitation_items.get(position=position)
    return elicitation_pick_record(participant=participant, item_id=item.pk, choice=choice)


def participant_waiting(study: Study, **kwargs: object) -> Participant:
    """A participant who has made every pick and waits for their responses."""
    participant = participant_at_elicitation(study, **kwargs)
    for position in range(participant.n_picks):
        pick(participant, position)
    participant.refresh_from_db()
    return participant


def fake_responses(participant: Participant) -> list[NewResponse]:
    """A response of every arm to each of the participant's evaluation questions (no model involved)."""
    questions = evaluation_questions_for(participant=participant)
    arms = participant.study.arms.order_by("id")
    return [
        NewResponse(arm_id=arm.pk, question_id=q.pk, text=f"Response {i}-{j} to {q.text}")
        for i, arm in enumerate(arms)
        for j, q in enumerate(questions)
    ]


def participant_rating(study: Study, **kwargs: object) -> Participant:
    """A participant whose responses are stored and who is on their first A/B item."""
    participant = participant_waiting(study, **kwargs)
    responses_store(participant_id=participant.pk, responses=fake_responses(participant))
    participant.refresh_from_db()
    return participant


def rate(participant: Participant, position: int, choice: str = Side.LEFT, strength: int = 4) -> bool:
    item = participant.rating_items.get(position=position)
    return rating_record(participant=participant, item_id=item.pk, choice=choice, strength=strength)


def rate_all(participant: Participant, *, pass_attention_checks: bool = True) -> Participant:
    for item in participant.rating_items.order_by("position"):
        choice = item.expected_choice or Side.LEFT
        if item.is_attention_check and not pass_attention_checks:
            choice = Side.RIGHT if item.expected_choice == Side.LEFT else Side.LEFT
        rate(participant, item.position, choice)
    participant.refresh_from_db()
    return participant


def make_coordinator(**fields: Any) -> User:
    """A staff user: a study coordinator."""
    return User.objects.create_user(
        username=f"coordinator-{next(_serial)}",
        password="a-long-test-password",
        **{"is_staff": True, **fields},
    )


def make_job(**fields: Any) -> Job:
    """A job row as job_launch would write it (nothing is enqueued)."""
    defaults: dict[str, Any] = {"kind": Job.Kind.SYNTH, "params": {"name": f"job-{next(_serial)}"}}
    return Job.objects.create(**{**defaults, **fields})
