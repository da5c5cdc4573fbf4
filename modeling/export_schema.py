"""The study export's tables (`fspo-study-export-2`; 2 added the judgments of kind tie): each column defined once, here, as a pyarrow schema
whose fields carry their meaning. annotation.exports writes every format from these and reads them back
(CSV and JSONL included); modeling.analysis reads the columns it needs with these types; docs/analyst-guide.md
lists the same columns (a test keeps the two in step). It lives in modeling, which never imports Django,
because both sides read it: the web side writes exports, the analyses read them.

Change a table's columns (added, removed, renamed, retyped or given a new meaning) only together with
EXPORT_SCHEMA_VERSION, so that an analysis can check the version it was written for.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

EXPORT_SCHEMA_VERSION = "fspo-study-export-2"
# The versions an analysis reads: 1 has the same columns and no judgments of kind tie, so it reads as 2.
READABLE_SCHEMA_VERSIONS = (EXPORT_SCHEMA_VERSION, "fspo-study-export-1")
FORMATS = ("csv", "jsonl", "parquet")
MANIFEST = "manifest.json"  # an export folder's index: its schema version and each table's file

TIMESTAMP = pa.timestamp("us", tz="UTC")


def _col(name: str, type_: pa.DataType, description: str) -> pa.Field:
    return pa.field(name, type_, nullable=True, metadata={"description": description})


@dataclass(frozen=True)
class TableSpec:
    """One export table: its columns (`schema`, None for episodes, which are the modeling episode schema)
    and the formats it is written in."""

    name: str
    description: str
    schema: pa.Schema | None
    formats: tuple[str, ...] = FORMATS

    @property
    def columns(self) -> list[str]:
        return [] if self.schema is None else self.schema.names


def _schema(table: str, *fields: pa.Field) -> pa.Schema:
    return pa.schema(fields, metadata={"fspo_export_schema": EXPORT_SCHEMA_VERSION, "table": table})


PARTICIPANT = "The participant's pseudonym (p- and 16 hex digits; a keyed hash, see Pseudonyms)."

JUDGMENTS = _schema(
    "judgments",
    _col("participant", pa.string(), PARTICIPANT),
    _col("participant_state", pa.string(), "The participant's state at export time."),
    _col("participant_complete", pa.bool_(), "The participant has completed the study (state completed)."),
    _col(
        "kind",
        pa.string(),
        "pick (an elicitation pick), rating (a blind A/B rating) or tie (an imported A/B judgment that chose "
        "neither side: no chosen_side, no arm_won; no win rate counts it).",
    ),
    _col("position", pa.int32(), "0-based place of the item in the participant's sequence of this kind."),
    _col("question_id", pa.int64(), "The question (pool table); null for an attention check."),
    _col("question_text", pa.string(), "The question as shown (attention checks: their fixed text)."),
    _col("pair_id", pa.int64(), "Picks: the candidate pair shown (pool table)."),
    _col("a_on_left", pa.bool_(), "Picks: response_a of the pair was shown on the left."),
    _col("left_response_id", pa.int64(), "Ratings: the response shown on the left (responses table)."),
    _col("right_response_id", pa.int64(), "Ratings: the response shown on the right (responses table)."),
    _col("left_arm", pa.string(), "Ratings: the arm that wrote the left response."),
    _col("right_arm", pa.string(), "Ratings: the arm that wrote the right response."),
    _col("chosen_side", pa.string(), "left or right: the side the participant chose (null for a tie)."),
    _col("chosen_response_id", pa.int64(), "Ratings: the response chosen (null for attention checks)."),
    _col("chosen_arm", pa.string(), "Ratings: the arm whose response was chosen."),
    _col("arm", pa.string(), "Ratings: the arm of the study comparison this pair belongs to."),
    _col("baseline", pa.string(), "Ratings: the baseline of that comparison."),
    _col("arm_won", pa.bool_(), "Ratings: the comparison's arm was chosen over its baseline."),
    _col("strength", pa.int32(), "Ratings: how much better, 1 (barely) to 5 (much better)."),
    _col("reason", pa.string(), "Ratings: the participant's one-sentence reason (empty when none)."),
    _col("is_repeat", pa.bool_(), "A consistency repeat: an earlier pair shown again, sides swapped."),
    _col("repeat_of_position", pa.int32(), "Repeats: the position of the original item."),
    _col("repeat_consistent", pa.bool_(), "Repeats: the same response was chosen as in the original."),
    _col("is_attention_check", pa.bool_(), "An attention check (its text says which side to pick)."),
    _col("expected_choice", pa.string(), "Attention checks: the side the check asked for."),
    _col("attention_passed", pa.bool_(), "Attention checks: the side chosen is the one asked for."),
    _col("elapsed_ms", pa.int64(), "From the item first being shown to the answer (server clock)."),
    _col("shown_at", TIMESTAMP, "When the item was first shown."),
    _col("answered_at", TIMESTAMP, "When the answer was recorded."),
)

PARTICIPANTS = _schema(
    "participants",
    _col("participant", pa.string(), PARTICIPANT),
    _col("state", pa.string(), "The participant's state at export time."),
    _col("complete", pa.bool_(), "Completed the study (state completed)."),
    _col(
        "excluded",
        pa.bool_(),
        "Returned or timed out: judgments kept, but the studio's analyses leave them out.",
    ),
    _col("has_recruitment_id", pa.bool_(), "Arrived with a recruitment id (PROLIFIC_PID)."),
    _col(
        "generation", pa.string(), "Status of their personalized responses (not_started ... ready, failed)."
    ),
    _col("n_picks", pa.int32(), "Pairs assigned for picks."),
    _col("picks_done", pa.int32(), "Picks made."),
    _col("n_ratings", pa.int32(), "A/B items assigned (pairs, repeats and attention checks)."),
    _col("ratings_done", pa.int32(), "A/B items rated."),
    _col("created_at", TIMESTAMP, "Arrival (first visit of the entry link)."),
    _col("consented_at", TIMESTAMP, "Consent given."),
    _col("finished_at", TIMESTAMP, "Study ended for them (completed, declined, screened out, ...)."),
    _col("duration_s", pa.float64(), "finished_at - consented_at in seconds, when both are known."),
    _col("median_pick_ms", pa.float64(), "Median elapsed_ms of their picks."),
    _col(
        "median_rating_ms", pa.float64(), "Median elapsed_ms of their A/B ratings, attention checks excluded."
    ),
    _col("attention_checks_answered", pa.int32(), "Attention checks rated."),
    _col("attention_failures", pa.int32(), "Attention checks answered with the other side."),
    _col("attention_failures_allowed", pa.int32(), "The study's rule: more failures than this fails."),
    _col("failed_attention", pa.bool_(), "attention_failures > attention_failures_allowed."),
    _col("repeats_answered", pa.int32(), "Consistency repeats rated (with their original rated)."),
    _col("repeats_consistent", pa.int32(), "Of those, repeats where the same response was chosen again."),
    _col("too_fast_ms", pa.int64(), "The export's rule: a median rating time under this is too fast."),
    _col("too_fast", pa.bool_(), "median_rating_ms < too_fast_ms (null without a timed rating)."),
    _col("survey_submitted_at", TIMESTAMP, "When the closing survey was submitted (null: no survey)."),
    _col("self_description", pa.string(), "Survey: how they describe themselves (optional)."),
    _col("age_range", pa.string(), "Survey: 18-24, 25-34, 35-44, 45-54, 55-64, 65+ (optional)."),
    _col("gender", pa.string(), "Survey: free text (optional)."),
    _col("education", pa.string(), "Survey: secondary, some_college, bachelor, graduate (optional)."),
    _col("occupation", pa.string(), "Survey: free text (optional)."),
    _col("comments", pa.string(), "Survey: comments on the study (optional)."),
)

RESPONSES = _schema(
    "responses",
    _col("response_id", pa.int64(), "The response (judgments.left/right/chosen_response_id)."),
    _col("participant", pa.string(), PARTICIPANT),
    _col("participant_state", pa.string(), "The participant's state at export time."),
    _col("arm", pa.string(), "The arm's name."),
    _col("method", pa.string(), "fspo, fspo_cot, fewshot or no_context."),
    _col("checkpoint", pa.string(), "The arm's generation spec (model or adapter directory, or server)."),
    _col("cot", pa.bool_(), "The model wrote a user description before the response."),
    _col("shots", pa.int32(), "Picks in the prompt as few-shot examples (0 for a no-context arm)."),
    _col("question_id", pa.int64(), "The evaluation question (pool table)."),
    _col("question_text", pa.string(), "The question."),
    _col("text", pa.string(), "The response shown to the participant."),
    _col("user_description", pa.string(), "What a CoT arm wrote about the user first (empty otherwise)."),
    _col("prompt_tokens", pa.int32(), "Tokens in the prompt."),
    _col("new_tokens", pa.int32(), "Tokens generated."),
    _col("finish_reason", pa.string(), "Why generation stopped (stop, length, ...)."),
    _col("temperature", pa.float64(), "Decoding temperature (0: greedy)."),
    _col("top_p", pa.float64(), "Nucleus sampling threshold (1: off)."),
    _col("max_new_tokens", pa.int32(), "The study's token limit at export time (see the guide)."),
    _col("prompt_format", pa.string(), "The prompt format version (modeling.data.PROMPT_FORMAT_VERSION)."),
    _col("created_at", TIMESTAMP, "When the response was stored."),
)

STUDY = _schema(
    "study",
    _col("schema_version", pa.string(), "EXPORT_SCHEMA_VERSION of this export."),
    _col("exported_at", TIMESTAMP, "When the export started."),
    _col("slug", pa.string(), "The study's slug (its entry link is /s/<slug>/)."),
    _col("title", pa.string(), "The study's title."),
    _col("domain", pa.string(), "The synthetic domain its pool comes from."),
    _col("instruction", pa.string(), "The task instruction the models get under # Task."),
    _col("n_pairs", pa.int32(), "Picks per participant (N shots)."),
    _col("n_eval_questions", pa.int32(), "Held-out questions per participant."),
    _col("consistency_repeats", pa.int32(), "Rated pairs shown again, sides swapped."),
    _col("attention_checks", pa.int32(), "Attention checks per participant."),
    _col("attention_failures_allowed", pa.int32(), "Failed checks allowed before failed_attention."),
    _col("quota", pa.int32(), "Places."),
    _col("max_new_tokens", pa.int32(), "Token limit of each generated response."),
    _col("time_limit_minutes", pa.int32(), "Inactivity after which a participant is timed out."),
    _col("is_open", pa.bool_(), "The study takes new participants."),
    _col("consent_text", pa.string(), "The consent text."),
    _col("instructions_text", pa.string(), "The instructions shown before the picks (empty: standard)."),
    _col("arms", pa.string(), "JSON list of {name, method, checkpoint}."),
    _col("comparisons", pa.string(), "JSON list of {arm, baseline}, in the order items were built."),
    _col("pool_elicitation_pairs", pa.int32(), "Candidate pairs in the pool."),
    _col("pool_evaluation_questions", pa.int32(), "Evaluation questions in the pool."),
    _col("participants", pa.int32(), "Participants exported (every one but the withdrawn)."),
    _col("participants_completed", pa.int32(), "Of those, completed."),
    _col("participants_in_progress", pa.int32(), "Of those, not finished yet (their rows are partial)."),
    _col("participants_withdrawn", pa.int32(), "Withdrew: their data was deleted and is not exported."),
    _col("complete", pa.bool_(), "The study is closed and nobody is in progress: the data is final."),
    _col("too_fast_ms", pa.int64(), "The too-fast rule of the participants table."),
    _col("pseudonym_scheme", pa.string(), "How participant pseudonyms are made (see Pseudonyms)."),
    _col("prompt_format", pa.string(), "The models' prompt format version."),
    _col("episode_format", pa.string(), "The episodes table's format and version (modeling.data)."),
    _col("created_at", TIMESTAMP, "When the study was created."),
    _col("updated_at", TIMESTAMP, "When its settings last changed."),
)

POOL = _schema(
    "pool",
    _col("question_id", pa.int64(), "The question."),
    _col("use", pa.string(), "elicitation (shown with candidate pairs) or evaluation (held out)."),
    _col("question_text", pa.string(), "The question."),
    _col("topic", pa.string(), "Its topic in the source dataset (may be empty)."),
    _col("source_id", pa.string(), "Its id in the dataset or file it came from (may be empty)."),
    _col("pair_id", pa.int64(), "Elicitation: the candidate pair (one row each); null for evaluation."),
    _col("response_a", pa.string(), "Elicitation: the pair's first response."),
    _col("response_b", pa.string(), "Elicitation: the pair's second response."),
)

TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec("judgments", "One row per elicitation pick, A/B rating or imported tie.", JUDGMENTS),
        TableSpec("participants", "One row per participant (withdrawn ones excepted).", PARTICIPANTS),
        TableSpec("responses", "One row per generated response (arm x evaluation question).", RESPONSES),
        TableSpec("study", "The study's configuration and counts, one row.", STUDY),
        TableSpec("pool", "The question pool: candidate pairs and evaluation questions.", POOL),
        TableSpec(
            "episodes",
            "Each rated A/B pair as a modeling episode: the picks as shots, the pair as the target.",
            None,
            formats=("jsonl",),
        ),
    )
}
TABLE_NAMES = tuple(TABLES)
