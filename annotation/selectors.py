"""Reads of items and judgments, and the rows → episodes translation the personalization worker needs."""

import random
from dataclasses import dataclass

from modeling.data import Episode, Pair
from studyapp.models import Arm, Participant

from .models import ElicitationItem, ElicitationPick, GeneratedResponse, Question, RatingItem


def elicitation_item_at(*, participant: Participant, position: int) -> ElicitationItem:
    return ElicitationItem.objects.select_related("pair__question").get(
        participant=participant, position=position
    )


def rating_item_at(*, participant: Participant, position: int) -> RatingItem:
    return RatingItem.objects.select_related("question", "left", "right").get(
        participant=participant, position=position
    )


def participant_shots(*, participant: Participant) -> tuple[Pair, ...]:
    """The participant's picks as FSPO few-shot pairs (question, chosen, rejected), in the order made."""
    picks = ElicitationPick.objects.filter(item__participant=participant).select_related(
        "item__pair__question"
    )
    return tuple(
        Pair(question=p.item.pair.question.text, chosen=p.chosen, rejected=p.rejected)
        for p in picks.order_by("item__position")
    )


def evaluation_questions_for(*, participant: Participant) -> list[Question]:
    """The held-out questions this participant's responses are generated for: a sample of the study's
    evaluation pool drawn from the participant's own seed, so a retried task asks the same ones."""
    study = participant.study
    pool = list(Question.objects.filter(study=study, use=Question.Use.EVALUATION).order_by("id"))
    rng = random.Random(f"{participant.token}:evaluation")
    return rng.sample(pool, min(study.n_eval_questions, len(pool)))


@dataclass(frozen=True)
class ArmEpisodes:
    """One arm's work for a participant: an episode per evaluation question (the picks as shots, or none
    for a no-context arm), for the checkpoint `checkpoint`."""

    arm_id: int
    checkpoint: str
    cot: bool
    episodes: tuple[Episode, ...]


@dataclass(frozen=True)
class PersonalizationRequest:
    participant_id: int
    max_new_tokens: int
    question_ids: tuple[int, ...]  # the order of every arm's episodes
    arms: tuple[ArmEpisodes, ...]


def personalization_request(*, participant_id: int) -> PersonalizationRequest | None:
    """What to generate for a participant who is waiting for their responses, or None when there is
    nothing to do (gone, withdrawn, or responses already stored)."""
    participant = Participant.objects.select_related("study").filter(pk=participant_id).first()
    if participant is None or participant.state != Participant.State.WAITING:
        return None
    if GeneratedResponse.objects.filter(participant=participant).exists():
        return None
    study = participant.study
    shots = participant_shots(participant=participant)
    questions = evaluation_questions_for(participant=participant)
    arms = []
    for arm in Arm.objects.filter(study=study).order_by("id"):
        episodes = tuple(
            Episode(
                instruction=study.instruction,
                shots=shots if arm.uses_picks else (),
                question=q.text,
                user_id=participant.token,
                domain=study.domain,
                meta={"question_id": q.id},
            )
            for q in questions
        )
        arms.append(ArmEpisodes(arm.id, arm.checkpoint, arm.cot, episodes))
    return PersonalizationRequest(
        participant.id, study.max_new_tokens, tuple(q.id for q in questions), tuple(arms)
    )
