"""The study settings a coordinator sets, named once: grouped as the studio's study page shows them, with
the labels the page gives them. The studio's service takes exactly these Study fields (STUDY_FIELDS),
and its form shows them, section by section (STUDY_SECTIONS)."""

from typing import NamedTuple


class Setting(NamedTuple):
    name: str  # a Study field
    label: str = ""  # the page's label for it; empty: the field's own (from its name)


class StudySection(NamedTuple):
    title: str
    about: str  # what the group is for, shown under its title; empty: nothing
    settings: tuple[Setting, ...]


STUDY_SECTIONS: tuple[StudySection, ...] = (
    StudySection(
        "The study", "", (Setting("title"), Setting("slug"), Setting("domain"), Setting("instruction"))
    ),
    StudySection(
        "What each participant does",
        "Counts are fixed for a participant when they reach each step, so edits never move someone "
        "who has started.",
        (
            Setting("n_pairs", "Elicitation pairs per participant (N shots)"),
            Setting("n_eval_questions", "Evaluation questions per participant"),
            Setting("consistency_repeats", "Consistency repeats"),
            Setting("attention_checks", "Attention checks"),
            Setting("attention_failures_allowed", "Attention-check failures allowed"),
            Setting("max_new_tokens", "Longest response (tokens)"),
        ),
    ),
    StudySection(
        "Recruitment and consent",
        "",
        (
            Setting("quota"),
            Setting("time_limit_minutes", "Time limit (minutes of inactivity)"),
            Setting("consent_text"),
            Setting("instructions_text", "Instructions"),
            Setting("completion_code", "Completion code"),
            Setting("screened_out_code", "Code when screened out (study full)"),
            Setting("failed_attention_code", "Code after failed attention checks"),
            Setting("declined_code", "Code when consent is declined"),
            Setting("completion_url", "Completion link"),
        ),
    ),
    StudySection("Status", "", (Setting("is_open", "Open: the study takes new participants"),)),
)

# The Study fields a coordinator sets (everything but the bookkeeping), in the page's order.
STUDY_FIELDS: tuple[str, ...] = tuple(s.name for section in STUDY_SECTIONS for s in section.settings)

# The labels the page gives the fields that do not go by their own name.
STUDY_LABELS: dict[str, str] = {
    s.name: s.label for section in STUDY_SECTIONS for s in section.settings if s.label
}
