"""The episodes table: each rated A/B pair in the modeling episode schema (modeling.data.Episode), with the
participant's picks as its shots, exactly as the personalization worker put them in the prompt."""

from collections.abc import Iterator

from modeling.data import Episode, Pair
from modeling.export_schema import EXPORT_SCHEMA_VERSION
from studyapp.models import Study

from ..models import ElicitationPick, Rating, Side
from .paging import (
    ArmInfo,
    ExportOptions,
    Row,
    Who,
    participant_pages,
    study_arms,
)

EPISODE_PICK_FIELDS = (
    "item__participant_id",
    "item__pair__question__text",
    "item__pair__response_a",
    "item__pair__response_b",
    "item__a_on_left",
    "choice",
)
EPISODE_TARGET_FIELDS = (
    "item__participant_id",
    "item__position",
    "item__question_id",
    "item__question__text",
    "choice",
    "strength",
    "item__left_id",
    "item__right_id",
    "item__left__text",
    "item__right__text",
    "item__left__arm_id",
    "item__right__arm_id",
)


def _shot(row: Row) -> Pair:
    """A pick as a few-shot pair, as the worker builds it (ElicitationPick.chosen / .rejected)."""
    _, question, response_a, response_b, a_on_left, choice = row
    a_chosen = (choice == Side.LEFT) == a_on_left
    return Pair(question, *((response_a, response_b) if a_chosen else (response_b, response_a)))


def episode_pages(study: Study, options: ExportOptions) -> Iterator[list[Episode]]:
    """The episodes table: one modeling Episode per rated A/B pair (attention checks and consistency
    repeats left out), with the participant's picks as its shots in the order made (exactly what the
    worker put in the prompt), the pair's question as its question, and the response the participant
    chose and the other one as `chosen` and `rejected`. A pair with an empty response has no target and
    is left out. `description` is the participant's survey self-description, when they gave one."""
    study = Study.objects.get(pk=study.pk)
    arms = study_arms(study)
    kinds = {
        "shots": ElicitationPick.objects.filter(item__participant__study=study)
        .order_by("item__participant_id", "item__position")
        .values_list(*EPISODE_PICK_FIELDS),
        "targets": Rating.objects.filter(
            item__participant__study=study, item__is_attention_check=False, item__is_repeat=False
        )
        .order_by("item__participant_id", "item__position")
        .values_list(*EPISODE_TARGET_FIELDS),
    }
    fields = ("survey__self_description",)
    for page in participant_pages(study, chunk_size=options.chunk_size, fields=fields, rows=kinds):
        episodes = []
        for m in page:
            shots = tuple(_shot(row) for row in m.rows["shots"])
            description = m.fields["survey__self_description"] or None
            for target in m.rows["targets"]:
                episode = _episode(study, m.who, shots, target, arms, description)
                if episode is not None:
                    episodes.append(episode)
        yield episodes


def _episode(
    study: Study,
    who: Who,
    shots: tuple[Pair, ...],
    target: Row,
    arms: dict[int, ArmInfo],
    description: str | None,
) -> Episode | None:
    (
        _,
        position,
        question_id,
        question,
        choice,
        strength,
        left_id,
        right_id,
        left,
        right,
        left_arm,
        right_arm,
    ) = target
    if choice == Side.LEFT:
        chosen, rejected, ids, arm_ids = left, right, (left_id, right_id), (left_arm, right_arm)
    else:
        chosen, rejected, ids, arm_ids = right, left, (right_id, left_id), (right_arm, left_arm)
    if not chosen.strip() or not rejected.strip():
        return None
    return Episode(
        instruction=study.instruction,
        shots=shots,
        question=question,
        chosen=chosen,
        rejected=rejected,
        description=description,
        user_id=who.pseudonym,
        domain=study.domain,
        meta={
            "export_schema": EXPORT_SCHEMA_VERSION,
            "study": study.slug,
            "participant_state": who.state,
            "participant_complete": who.complete,
            "question_id": question_id,
            "rating_position": position,
            "strength": strength,
            "chosen_response_id": ids[0],
            "rejected_response_id": ids[1],
            "chosen_arm": arms[arm_ids[0]].name,
            "rejected_arm": arms[arm_ids[1]].name,
        },
    )
