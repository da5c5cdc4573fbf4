"""Rows for tests: a small study with its pool and arms, and participants at any step of the journey
(brought there through the real services, so their rows are what the site would have written)."""

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.contrib.auth.models import Group, User
from django.utils import timezone

from annotation.models import CandidatePair, GeneratedResponse, Question, RatingItem, Side
from annotation.selectors import evaluation_questions_for
from studyapp.coordinators import ANALYSTS_GROUP
from studyapp.models import Arm, Comparison, Job, Participant, Study
from studyapp.services import (
    NewResponse,
    elicitation_pick_record,
    participant_consent,
    participant_enroll,
    participant_mark_returned,
    participant_start_elicitation,
    rating_record,
    responses_store,
    survey_record,
)

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


def participant_completed(
    study: Study,
    *,
    pass_attention_checks: bool = True,
    survey: dict[str, Any] | None = None,
    **kwargs: object,
) -> Participant:
    """A participant who has rated every A/B item and answered the survey (`survey`: its answers)."""
    participant = rate_all(participant_rating(study, **kwargs), pass_attention_checks=pass_attention_checks)
    survey_record(participant=participant, answers=survey or {})
    participant.refresh_from_db()
    return participant


def make_coordinator(**fields: Any) -> User:
    """A staff user: a study coordinator."""
    return User.objects.create_user(
        username=f"coordinator-{next(_serial)}",
        password="a-long-test-password",
        **{"is_staff": True, **fields},
    )


def make_analyst(**fields: Any) -> User:
    """A member of the analysts group: sees and exports, changes nothing."""
    user = User.objects.create_user(
        username=f"analyst-{next(_serial)}", password="a-long-test-password", **fields
    )
    user.groups.add(Group.objects.get_or_create(name=ANALYSTS_GROUP)[0])
    return user


def make_job(**fields: Any) -> Job:
    """A job row as job_launch would write it (nothing is enqueued)."""
    defaults: dict[str, Any] = {"kind": Job.Kind.SYNTH, "params": {"name": f"job-{next(_serial)}"}}
    return Job.objects.create(**{**defaults, **fields})


# ---------------------------------------------------------------------------------------------------
# Simulated participants with known hidden preferences (the analyses' tests)


@dataclass(frozen=True)
class Persona:
    """A simulated participant: how they choose, and what they answer.

    `prefers_arm`: chance of choosing the comparison arm's response over its baseline's; `repeat_agreement`:
    chance of choosing the same response again when a pair comes back with sides swapped; `prefers_a`:
    chance of picking the pool pair's response_a; `answer_ms`: time taken per A/B item. `shots`: the
    study's picks per participant when they start (None: as it is); `identical_pair`: the CoT arm's and
    the baseline's responses to their first question are the same text (a tie); `stop_after`: ratings made
    before they stop (None: every one, then the survey); `returned`: marked returned at the end."""

    prefers_arm: float = 0.8
    repeat_agreement: float = 1.0
    prefers_a: float = 0.5
    answer_ms: int = 6000
    passes_attention: bool = True
    survey: dict[str, Any] | None = None
    shots: int | None = None
    description: str = ""
    identical_pair: bool = False
    stop_after: int | None = None
    returned: bool = False


@dataclass
class Simulated:
    """What a simulated participant did, as the simulation decided it (the ground truth).

    `ratings`: (arm, baseline, arm_won, tie) per counted A/B pair; `repeats`: (chose the original's left
    response the first time, ... the second time) per answered repeat; `picks`: pair id -> "a" or "b"."""

    persona: Persona
    participant: Participant
    ratings: list[tuple[str, str, bool, bool]] = field(default_factory=list)
    repeats: list[tuple[bool, bool]] = field(default_factory=list)
    picks: dict[int, str] = field(default_factory=dict)
    attention_failures: int = 0


def make_simulated_study(
    *, n_pairs: int = 3, pool_pairs: int = 5, n_eval_questions: int = 4, **fields: Any
) -> Study:
    """A study of three arms, each on its own checkpoint: fspo (FSPO) and cot (FSPO + user-description
    CoT), each compared with base (no context); two repeats and one attention check per participant."""
    study = make_study(
        n_pairs=pool_pairs - 1,
        n_eval_questions=n_eval_questions,
        checkpoint="/ckpt/fspo",
        **{"domain": "roleplay", "consistency_repeats": 2, "quota": 100, **fields},
    )
    study.n_pairs = n_pairs
    study.save(update_fields=["n_pairs"])
    Arm.objects.filter(study=study, name="base").update(checkpoint="/ckpt/base")
    cot = Arm.objects.create(study=study, name="cot", method=Arm.Method.FSPO_COT, checkpoint="/ckpt/cot")
    Comparison.objects.create(study=study, arm=cot, baseline=study.arms.get(name="base"))
    return study


def _simulated_responses(participant: Participant, persona: Persona) -> list[NewResponse]:
    arms = {arm.name: arm for arm in participant.study.arms.all()}
    out = []
    for j, q in enumerate(evaluation_questions_for(participant=participant)):
        texts = {name: f"{name} answer {j} for {participant.token[:6]}: {q.text}" for name in arms}
        if persona.identical_pair and j == 0:
            texts["cot"] = texts["base"]
        for name, arm in arms.items():
            out.append(
                NewResponse(
                    arm_id=arm.pk,
                    question_id=q.pk,
                    text=texts[name],
                    user_description=persona.description if arm.cot else "",
                )
            )
    return out


def simulate_participant(study: Study, persona: Persona, *, seed: int) -> Simulated:
    """A participant who takes the study through the real services, choosing as `persona` says (drawn
    from random.Random(seed)), with the time per A/B item set by when each item was shown.

    Their token, which seeds every draw the platform makes for them (pairs, evaluation questions, sides
    and order), comes from the study and `seed` too, so the same simulation gives the same judgments on
    every run."""
    rng = random.Random(seed)
    if persona.shots is not None:
        Study.objects.filter(pk=study.pk).update(n_pairs=persona.shots)
    participant = make_participant(study)
    participant.token = hashlib.sha256(f"{study.slug}:{seed}".encode()).hexdigest()[:32]
    Participant.objects.filter(pk=participant.pk).update(token=participant.token)
    participant_consent(participant=participant, agreed=True)
    participant = participant_start_elicitation(participant=participant)
    sim = Simulated(persona, participant)
    for item in participant.elicitation_items.order_by("position"):
        want_a = rng.random() < persona.prefers_a
        sim.picks[item.pair_id] = "a" if want_a else "b"
        pick(participant, item.position, Side.LEFT if want_a == item.a_on_left else Side.RIGHT)
    responses_store(participant_id=participant.pk, responses=_simulated_responses(participant, persona))
    arm_of = {
        r.pk: r.arm.name
        for r in GeneratedResponse.objects.filter(participant=participant).select_related("arm")
    }
    text_of = dict(GeneratedResponse.objects.filter(participant=participant).values_list("pk", "text"))
    pairs = {(c.arm.name, c.baseline.name) for c in study.comparisons.select_related("arm", "baseline")}
    chosen: dict[int, int] = {}  # position -> response id chosen
    items = list(participant.rating_items.order_by("position"))
    for item in items[: persona.stop_after]:
        if item.is_attention_check:
            choice = item.expected_choice
            if not persona.passes_attention:
                choice = Side.RIGHT if choice == Side.LEFT else Side.LEFT
                sim.attention_failures += 1
        elif item.is_repeat:
            original = item.repeat_of
            again = rng.random() < persona.repeat_agreement
            first_left = chosen[original.position] == original.left_id
            second_left = first_left if again else not first_left
            # The repeat shows the original's left response on the right.
            choice = Side.RIGHT if second_left else Side.LEFT
            sim.repeats.append((first_left, second_left))
        else:
            names = (arm_of[item.left_id], arm_of[item.right_id])
            arm, baseline = names if names in pairs else names[::-1]
            arm_side = Side.LEFT if arm_of[item.left_id] == arm else Side.RIGHT
            arm_won = rng.random() < persona.prefers_arm
            choice = arm_side if arm_won else (Side.RIGHT if arm_side == Side.LEFT else Side.LEFT)
            sim.ratings.append((arm, baseline, arm_won, text_of[item.left_id] == text_of[item.right_id]))
        RatingItem.objects.filter(pk=item.pk).update(
            shown_at=timezone.now() - timedelta(milliseconds=persona.answer_ms)
        )
        rate(participant, item.position, choice)
        if not item.is_attention_check:
            chosen[item.position] = item.left_id if choice == Side.LEFT else item.right_id
    participant.refresh_from_db()
    if persona.stop_after is None:
        survey_record(participant=participant, answers=persona.survey or {})
    if persona.returned:
        participant_mark_returned(participant=participant)
    participant.refresh_from_db()
    return sim
