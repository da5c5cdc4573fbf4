"""The rows of the export tables judgments, participants, responses, study and pool, page by page
(paging.py), as tuples in the order of each table's schema (modeling.export_schema); episodes are in
episodes.py."""

import json
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from django.db.models import QuerySet

from modeling.data import EPISODE_FORMAT, EPISODE_VERSION, PROMPT_FORMAT_VERSION
from modeling.export_schema import EXPORT_SCHEMA_VERSION
from studyapp.models import Arm, Participant, Study

from ..models import (
    ATTENTION_CHECK_QUESTION,
    CandidatePair,
    ElicitationPick,
    GeneratedResponse,
    Question,
    Rating,
    RatingItem,
    Side,
)
from .episodes import episode_pages
from .paging import (
    PSEUDONYM_SCHEME,
    WORKER_DECODING,
    ArmInfo,
    ExportError,
    ExportOptions,
    Row,
    Who,
    comparisons_by_arms,
    export_summary,
    participant_pages,
    study_arms,
)

# ---------------------------------------------------------------------------------------------------
# judgments


PICK_FIELDS = (
    "item__participant_id",
    "item__position",
    "item__pair__question_id",
    "item__pair__question__text",
    "item__pair_id",
    "item__a_on_left",
    "choice",
    "elapsed_ms",
    "item__shown_at",
    "answered_at",
)
RATING_FIELDS = (
    "item__participant_id",
    "item__position",
    "item__question_id",
    "item__question__text",
    "item__left_id",
    "item__right_id",
    "item__left__arm_id",
    "item__right__arm_id",
    "choice",
    "strength",
    "reason",
    "item__is_repeat",
    "item__repeat_of__position",
    "item__repeat_of__left_id",
    "item__repeat_of__right_id",
    "item__repeat_of__rating__choice",
    "item__is_attention_check",
    "item__expected_choice",
    "elapsed_ms",
    "item__shown_at",
    "answered_at",
)


# An imported study's A/B items without a rating: the judgments that were ties (studyapp.services.imports;
# a rating always has a side). In a study run here an unrated item is one not answered yet: no row.
TIE_FIELDS = (
    "participant_id",
    "position",
    "question_id",
    "question__text",
    "left_id",
    "right_id",
    "left__arm_id",
    "right__arm_id",
    "is_repeat",
    "repeat_of__position",
    "shown_at",
)
POSITION = 4  # of a judgments row: who (3 columns), kind, position


def _chosen(choice: str, left: int, right: int) -> int:
    """The side a rating chose (a rating's choice is never null; a repeat's original is checked first)."""
    return left if choice == Side.LEFT else right


def _pick_row(who: Who, r: Row) -> Row:
    _, position, question_id, question_text, pair_id, a_on_left, choice, elapsed, shown, answered = r
    return (
        *(who.pseudonym, who.state, who.complete, "pick", position, question_id, question_text),
        *(pair_id, a_on_left, None, None, None, None, choice, None, None, None, None, None, None, None),
        *(False, None, None, False, None, None, elapsed, shown, answered),
    )


def _rating_row(
    who: Who, r: Row, arms: dict[int, ArmInfo], comparison_of: dict[frozenset[int], tuple[int, int]]
) -> Row:
    (
        *_,
        position,
        question_id,
        question_text,
        left_id,
        right_id,
        left_arm_id,
        right_arm_id,
        choice,
        strength,
        reason,
        is_repeat,
        repeat_of_position,
        original_left_id,
        original_right_id,
        original_choice,
        is_check,
        expected,
        elapsed,
        shown,
        answered,
    ) = r
    who_cols = (who.pseudonym, who.state, who.complete, "rating", position)
    if is_check:
        return (
            *who_cols,
            *(None, ATTENTION_CHECK_QUESTION, None, None, None, None, None, None, choice, None, None),
            *(None, None, None, strength, reason, False, None, None, True, expected, choice == expected),
            *(elapsed, shown, answered),
        )
    chosen_id = _chosen(choice, left_id, right_id)
    chosen_arm_id = _chosen(choice, left_arm_id, right_arm_id)
    comparison = comparison_of.get(frozenset((left_arm_id, right_arm_id)))
    arm, baseline, arm_won = None, None, None
    if comparison is not None:
        arm, baseline = arms[comparison[0]].name, arms[comparison[1]].name
        arm_won = chosen_arm_id == comparison[0]
    consistent = None
    if is_repeat and original_choice is not None:
        consistent = chosen_id == _chosen(original_choice, original_left_id, original_right_id)
    return (
        *who_cols,
        *(question_id, question_text, None, None, left_id, right_id),
        *(arms[left_arm_id].name, arms[right_arm_id].name, choice, chosen_id, arms[chosen_arm_id].name),
        *(arm, baseline, arm_won, strength, reason, is_repeat, repeat_of_position, consistent),
        *(False, None, None, elapsed, shown, answered),
    )


def _tie_row(
    who: Who, r: Row, arms: dict[int, ArmInfo], comparison_of: dict[frozenset[int], tuple[int, int]]
) -> Row:
    """An imported tie: kind "tie", the pair and its arms as shown, no side chosen, no winner."""
    _, position, question_id, question_text, left_id, right_id, left_arm_id, right_arm_id, *rest = r
    is_repeat, repeat_of_position, shown = rest
    comparison = comparison_of.get(frozenset((left_arm_id, right_arm_id)))
    arm, baseline = (arms[comparison[0]].name, arms[comparison[1]].name) if comparison else (None, None)
    return (
        *(who.pseudonym, who.state, who.complete, "tie", position, question_id, question_text, None, None),
        *(left_id, right_id, arms[left_arm_id].name, arms[right_arm_id].name, None, None, None),
        *(arm, baseline, None, None, None, is_repeat, repeat_of_position, None),
        *(False, None, None, None, shown, None),
    )


def _ties(study: Study) -> QuerySet[Any]:
    return (
        RatingItem.objects.filter(participant__study=study, is_attention_check=False, rating__isnull=True)
        .order_by("participant_id", "position")
        .values_list(*TIE_FIELDS)
    )


def _picks(study: Study, fields: Sequence[str]) -> QuerySet[Any]:
    return (
        ElicitationPick.objects.filter(item__participant__study=study)
        .order_by("item__participant_id", "item__position")
        .values_list(*fields)
    )


def _ratings(study: Study, fields: Sequence[str], **only: Any) -> QuerySet[Any]:
    return (
        Rating.objects.filter(item__participant__study=study, **only)
        .order_by("item__participant_id", "item__position")
        .values_list(*fields)
    )


def judgment_pages(study: Study, options: ExportOptions) -> Iterator[list[Row]]:
    """The judgments table: per participant (in id order), their picks then their ratings, each in the
    order they were shown; in an imported study its ties too, among the ratings in their places."""
    arms, comparison_of = study_arms(study), comparisons_by_arms(study)
    kinds = {"picks": _picks(study, PICK_FIELDS), "ratings": _ratings(study, RATING_FIELDS)}
    if study.is_imported:
        kinds["ties"] = _ties(study)
    for page in participant_pages(study, chunk_size=options.chunk_size, rows=kinds):
        rows: list[Row] = []
        for m in page:
            rows += [_pick_row(m.who, r) for r in m.rows["picks"]]
            rated = [_rating_row(m.who, r, arms, comparison_of) for r in m.rows["ratings"]]
            tied = [_tie_row(m.who, r, arms, comparison_of) for r in m.rows.get("ties", [])]
            rows += sorted(rated + tied, key=lambda row: row[POSITION]) if tied else rated
        yield rows


# ---------------------------------------------------------------------------------------------------
# participants

PARTICIPANT_FIELDS = (
    "generation",
    "n_picks",
    "picks_done",
    "n_ratings",
    "ratings_done",
    "created_at",
    "consented_at",
    "finished_at",
    "survey__submitted_at",
    "survey__self_description",
    "survey__age_range",
    "survey__gender",
    "survey__education",
    "survey__occupation",
    "survey__comments",
)
TIMING_FIELDS = (
    "item__participant_id",
    "elapsed_ms",
    "item__is_attention_check",
    "item__expected_choice",
    "choice",
    "item__is_repeat",
    "item__left_id",
    "item__right_id",
    "item__repeat_of__left_id",
    "item__repeat_of__right_id",
    "item__repeat_of__rating__choice",
)


def _median(values: Sequence[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(statistics.median(known)) if known else None


def _participant_row(
    study: Study, options: ExportOptions, who: Who, p: dict[str, Any], picks: list[Row], ratings: list[Row]
) -> Row:
    checks = [r for r in ratings if r[2]]
    failures = sum(r[4] != r[3] for r in checks)
    pairs = [r for r in ratings if not r[2]]
    median_rating = _median([r[1] for r in pairs])
    repeats = [r for r in pairs if r[5] and r[10] is not None]
    consistent = sum(_chosen(r[4], r[6], r[7]) == _chosen(r[10], r[8], r[9]) for r in repeats)
    consented, finished = p["consented_at"], p["finished_at"]
    duration = (finished - consented).total_seconds() if consented and finished else None
    return (
        *(who.pseudonym, who.state, who.complete, who.state in Participant.EXCLUDED_STATES),
        *(p["recruitment_id_hash"] is not None, p["generation"]),
        *(p["n_picks"], p["picks_done"], p["n_ratings"], p["ratings_done"]),
        *(p["created_at"], consented, finished, duration, _median([r[1] for r in picks]), median_rating),
        *(
            len(checks),
            failures,
            study.attention_failures_allowed,
            failures > study.attention_failures_allowed,
        ),
        *(len(repeats), consistent, options.too_fast_ms),
        None if median_rating is None else median_rating < options.too_fast_ms,
        p["survey__submitted_at"],
        *(p[f"survey__{f}"] for f in SURVEY_COLUMNS),
    )


SURVEY_COLUMNS = ("self_description", "age_range", "gender", "education", "occupation", "comments")


def participant_rows_pages(study: Study, options: ExportOptions) -> Iterator[list[Row]]:
    """The participants table, in participant id order."""
    study = Study.objects.get(pk=study.pk)  # the attention rule as it is now
    kinds = {
        "picks": _picks(study, ("item__participant_id", "elapsed_ms")),
        "ratings": _ratings(study, TIMING_FIELDS),
    }
    pages = participant_pages(study, chunk_size=options.chunk_size, fields=PARTICIPANT_FIELDS, rows=kinds)
    for page in pages:
        yield [
            _participant_row(study, options, m.who, m.fields, m.rows["picks"], m.rows["ratings"])
            for m in page
        ]


# ---------------------------------------------------------------------------------------------------
# responses

RESPONSE_FIELDS = (
    "participant_id",
    "pk",
    "arm_id",
    "question_id",
    "question__text",
    "text",
    "user_description",
    "prompt_tokens",
    "new_tokens",
    "finish_reason",
    "created_at",
)


def response_pages(study: Study, options: ExportOptions) -> Iterator[list[Row]]:
    """The responses table: per participant (in id order), by arm, then question."""
    arms = study_arms(study)
    max_new_tokens = Study.objects.values_list("max_new_tokens", flat=True).get(pk=study.pk)
    decoding = (WORKER_DECODING.temperature, WORKER_DECODING.top_p, max_new_tokens, PROMPT_FORMAT_VERSION)
    responses = (
        GeneratedResponse.objects.filter(participant__study=study)
        .order_by("participant_id", "arm_id", "question_id")
        .values_list(*RESPONSE_FIELDS)
    )
    for page in participant_pages(study, chunk_size=options.chunk_size, rows={"responses": responses}):
        rows: list[Row] = []
        for m in page:
            for _, pk, arm_id, question_id, question_text, *generated, created_at in m.rows["responses"]:
                arm = arms[arm_id]
                rows.append(
                    (
                        *(pk, m.who.pseudonym, m.who.state, arm.name, arm.method, arm.checkpoint, arm.cot),
                        m.who.n_picks if arm.uses_picks else 0,
                        *(question_id, question_text, *generated, *decoding, created_at),
                    )
                )
        yield rows


# ---------------------------------------------------------------------------------------------------
# study and pool


def study_pages(study: Study, options: ExportOptions) -> Iterator[list[Row]]:
    """The study table: its one row."""
    study = Study.objects.get(pk=study.pk)
    summary = export_summary(study=study)
    arms = [
        {"name": a.name, "method": a.method, "checkpoint": a.checkpoint}
        for a in Arm.objects.filter(study=study).order_by("name")
    ]
    comparisons = [
        {"arm": arm, "baseline": baseline}
        for arm, baseline in study.comparisons.order_by("pk").values_list("arm__name", "baseline__name")
    ]
    yield [
        (
            *(EXPORT_SCHEMA_VERSION, options.exported_at, study.slug, study.title, study.domain),
            *(study.instruction, study.n_pairs, study.n_eval_questions, study.consistency_repeats),
            *(study.attention_checks, study.attention_failures_allowed, study.quota, study.max_new_tokens),
            *(study.time_limit_minutes, study.is_open, study.consent_text, study.instructions_text),
            *(json.dumps(arms), json.dumps(comparisons)),
            CandidatePair.objects.filter(
                question__study=study, question__use=Question.Use.ELICITATION
            ).count(),
            Question.objects.filter(study=study, use=Question.Use.EVALUATION).count(),
            *(summary.participants, summary.completed, summary.in_progress, summary.withdrawn),
            *(summary.complete, options.too_fast_ms, PSEUDONYM_SCHEME, PROMPT_FORMAT_VERSION),
            f"{EPISODE_FORMAT}/{EPISODE_VERSION}",
            *(study.created_at, study.updated_at),
        )
    ]


def _pk_pages(rows: QuerySet[Any], fields: Sequence[str], chunk_size: int) -> Iterator[list[Row]]:
    """values_list(*fields) of `rows` in pages of `chunk_size`, keyset on the primary key (fields[0])."""
    last = 0
    while True:
        page = list(rows.filter(pk__gt=last).order_by("pk").values_list(*fields)[:chunk_size])
        if page:
            yield page
        if len(page) < chunk_size:
            return
        last = page[-1][0]


def pool_pages(study: Study, options: ExportOptions) -> Iterator[list[Row]]:
    """The pool table: the elicitation questions' candidate pairs, then the evaluation questions."""
    pairs = CandidatePair.objects.filter(question__study=study, question__use=Question.Use.ELICITATION)
    pair_fields = ("pk", "question_id", "question__text", "question__topic", "question__source_id")
    for page in _pk_pages(pairs, (*pair_fields, "response_a", "response_b"), options.chunk_size):
        yield [(q, "elicitation", text, topic, src, pk, a, b) for pk, q, text, topic, src, a, b in page]
    questions = Question.objects.filter(study=study, use=Question.Use.EVALUATION)
    for page in _pk_pages(questions, ("pk", "text", "topic", "source_id"), options.chunk_size):
        yield [(pk, "evaluation", text, topic, src, None, None, None) for pk, text, topic, src in page]


PAGES: dict[str, Callable[[Study, ExportOptions], Iterator[list[Any]]]] = {
    "judgments": judgment_pages,
    "participants": participant_rows_pages,
    "responses": response_pages,
    "study": study_pages,
    "pool": pool_pages,
    "episodes": episode_pages,
}


def table_pages(*, study: Study, table: str, options: ExportOptions | None = None) -> Iterator[list[Any]]:
    """A table's rows in pages: tuples in the order of its schema's columns (Episodes for episodes)."""
    if table not in PAGES:
        raise ExportError(f"no export table named {table!r} (tables: {', '.join(PAGES)})")
    return PAGES[table](study, options or ExportOptions())
