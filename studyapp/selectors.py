"""Reads about studies, participants and jobs (writes are in services.py)."""

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from django.db.models import BooleanField, Count, ExpressionWrapper, F, Q, QuerySet

from annotation.exports.paging import comparisons_by_arms
from annotation.models import Rating, Side
from modeling import winrate
from studyapp.datastore import datasets_available, output_name_free, relative_to_root
from studyapp.flow import STEP_OF_STATE, STEPS
from studyapp.models import Arm, Job, Participant, Study
from studyapp.pseudonyms import recruitment_id_hash

State = Participant.State


def participant_by_token(*, study_slug: str, token: str | None) -> Participant | None:
    """The study's participant with this token (with its study loaded), or None."""
    if not token:
        return None
    return Participant.objects.select_related("study").filter(study__slug=study_slug, token=token).first()


def participant_by_recruitment_id(*, study: Study, recruitment_id: str) -> Participant | None:
    """The study's participant with this recruitment id (PROLIFIC_PID; stored only as its keyed hash)."""
    id_hash = recruitment_id_hash(recruitment_id)
    return (
        Participant.objects.select_related("study").filter(study=study, recruitment_id_hash=id_hash).first()
    )


def participant_for_update(*, participant_id: int) -> Participant | None:
    """The participant (with its study), locked until the end of the current transaction: every change
    to a participant goes through this, so two tabs or a double-click never both move them."""
    return Participant.objects.select_for_update().select_related("study").filter(pk=participant_id).first()


def participant_status(*, participant: Participant) -> dict[str, Any]:
    """What the waiting page needs to know (the socket and the polling endpoint send exactly this).
    Never the generation error: that is for coordinators. `delayed`: their generation is queued but the
    broker has not taken it yet (it is sent once the broker is back)."""
    return {
        "state": participant.state,
        "generation": participant.generation,
        "delayed": participant.generation_is_delayed,
    }


def participant_status_by_token(*, token: str) -> dict[str, Any] | None:
    fields = ("state", "generation", "generation_sent_at", "generation_error")
    participant = Participant.objects.filter(token=token).only(*fields).first()
    return None if participant is None else participant_status(participant=participant)


def study_places_held(*, study: Study) -> set[int]:
    """The quota places (numbers in 1..quota, Participant.place) that the study's participants hold."""
    places = Participant.objects.filter(study=study, place__isnull=False).values_list("place", flat=True)
    return {place for place in places if place is not None}


def study_places_taken(*, study: Study) -> int:
    """Participants who hold a place (what the quota counts): they consented and are taking the study or
    have completed it. Not yet consented, withdrawn, declined, screened-out, returned and timed-out
    participants hold none."""
    return Participant.objects.filter(study=study, place__isnull=False).count()


def participant_attention_failures(*, participant: Participant) -> int:
    """Attention checks answered with the side they did not ask for."""
    checks = Rating.objects.filter(item__participant=participant, item__is_attention_check=True)
    return checks.exclude(choice=F("item__expected_choice")).count()


@dataclass(frozen=True)
class Outcome:
    """How a participant's study ended: `kind` picks the page's message; `code` (may be empty) and `url`
    (the recruitment platform's completion link with the code, or empty) are what they take back."""

    kind: str  # completed | failed_attention | screened_out | declined | withdrawn | returned | timed_out
    code: str
    url: str


def participant_outcome(*, participant: Participant) -> Outcome:
    study = participant.study
    if participant.state == State.COMPLETED:
        if participant_attention_failures(participant=participant) > study.attention_failures_allowed:
            kind, code = "failed_attention", study.failed_attention_code
        else:
            kind, code = "completed", study.completion_code
    elif participant.state == State.SCREENED_OUT:
        kind, code = "screened_out", study.screened_out_code
    elif participant.state == State.DECLINED:
        kind, code = "declined", study.declined_code
    elif participant.state in (State.WITHDRAWN, State.RETURNED, State.TIMED_OUT):
        kind, code = participant.state, ""  # no code: the study was not completed
    else:
        raise ValueError(f"participant {participant.token} has not finished (state {participant.state})")
    url = study.completion_url.replace("{code}", code) if study.completion_url and code else ""
    return Outcome(kind, code, url)


# ---------------------------------------------------------------------------------------------------
# The coordinators' studio


def studies_overview() -> QuerySet[Study]:
    """Every study with its participant counts (`n_participants`, `n_completed`), newest first."""
    return Study.objects.annotate(
        n_participants=Count("participants"),
        n_completed=Count("participants", filter=Q(participants__state=State.COMPLETED)),
    ).order_by("-created_at")


@dataclass(frozen=True)
class WinRate:
    """How often `arm`'s response was preferred to `baseline`'s in one comparison, computed as the
    analysis page computes it (modeling.winrate, over participants): `wins` of `n` counted ratings (arm
    preferred = 1, baseline preferred = 0, two responses of the same text = 1/2), the rate, its 95%
    percentile bootstrap interval over `participants` (None with fewer than two: `message` says why),
    and `p_value`, the one-sided sign test of a win rate above 50% (the paper's test). No rate while
    there are no ratings."""

    comparison_id: int
    arm: str
    baseline: str
    wins: float
    n: int
    rate: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    participants: int = 0
    message: str | None = None


def win_rate(
    *, comparison_id: int, arm: str, baseline: str, scores: Sequence[float], participants: Sequence[int]
) -> WinRate:
    """The comparison's win rate from each counted rating's score and the participant who gave it."""
    if not scores:
        return WinRate(comparison_id, arm, baseline, 0, 0, None, None, None, None)
    rate = winrate.win_rate(scores, over="participants", participants=participants)
    return WinRate(
        comparison_id,
        arm,
        baseline,
        rate.wins,
        rate.n,
        rate.win_rate,
        rate.ci_low,
        rate.ci_high,
        rate.p_value,
        rate.participants or 0,
        rate.message,
    )


def study_counted_ratings(*, study: Study) -> QuerySet[Rating]:
    """The ratings the study's win rates count: every rated A/B pair except attention checks, consistency
    repeats (a second look at a pair already counted), and the ratings of participants who returned the
    study or timed out (kept, but left out: Participant.EXCLUDED_STATES)."""
    return Rating.objects.filter(
        item__participant__study=study, item__is_attention_check=False, item__is_repeat=False
    ).exclude(item__participant__state__in=Participant.EXCLUDED_STATES)


def study_win_rates(*, study: Study) -> list[WinRate]:
    """The current win rate of every comparison of the study, from the ratings recorded so far
    (study_counted_ratings): each rated A/B item whose two responses are the comparison's arms, scored
    as modeling.winrate.rating_scores says. Where two comparisons hold the same two arms, their items
    cannot be told apart and count for the first (as in the export's judgments table)."""
    comparisons = list(study.comparisons.select_related("arm", "baseline").order_by("id"))
    comparison_of = comparisons_by_arms(study)
    # Per (arm id, baseline id): each counted rating's arm_won, same-text tie and participant.
    rated: dict[tuple[int, int], tuple[list[bool], list[bool], list[int]]] = {}
    same_text = ExpressionWrapper(Q(item__left__text=F("item__right__text")), output_field=BooleanField())
    for participant_id, choice, left_arm, right_arm, tie in (
        study_counted_ratings(study=study)
        .annotate(same_text=same_text)
        .values_list(
            "item__participant_id", "choice", "item__left__arm_id", "item__right__arm_id", "same_text"
        )
    ):
        arms = comparison_of.get(frozenset((left_arm, right_arm)))
        if arms is None:
            continue  # a pair of arms that is no comparison of the study
        won, ties, who = rated.setdefault(arms, ([], [], []))
        won.append((left_arm if choice == Side.LEFT else right_arm) == arms[0])
        ties.append(tie)
        who.append(participant_id)
    rates = []
    for c in comparisons:
        won, ties, who = rated.get((c.arm_id, c.baseline_id), ([], [], []))
        scores = winrate.rating_scores(won, ties).tolist()
        rates.append(
            win_rate(
                comparison_id=c.pk, arm=c.arm.name, baseline=c.baseline.name, scores=scores, participants=who
            )
        )
    return rates


@dataclass(frozen=True)
class StepCount:
    step: str
    title: str
    count: int


@dataclass(frozen=True)
class StudyDashboard:
    """What the live dashboard shows (the socket and the polling endpoint send `to_json()`)."""

    study_id: int
    participants: int
    places_taken: int
    quota: int
    by_step: list[StepCount]
    by_state: dict[str, int]
    completed: int
    median_completion_s: float | None
    generation_failed: int
    failed_attention: int
    excluded: int  # returned or timed out: their judgments are kept but not counted
    ratings: int
    win_rates: list[WinRate]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "median_completion": duration_text(self.median_completion_s)}


def duration_text(seconds: float | None) -> str:
    """A duration as people read it: "—", "45 s", "12 min 5 s", "2 h 3 min"."""
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def study_dashboard(*, study: Study) -> StudyDashboard:
    """Participants by step and by state (returned and timed-out participants are on the last step, and
    counted apart), completions and the median time to complete (from consent to the end of the survey),
    participants needing attention, and the win rate of every comparison."""
    by_state = dict.fromkeys(State.values, 0)
    for state, count in (
        Participant.objects.filter(study=study).values_list("state").annotate(count=Count("id")).order_by()
    ):
        by_state[state] = count
    by_step = [
        StepCount(
            spec.name, spec.title, sum(by_state[s] for s, step in STEP_OF_STATE.items() if step == spec.name)
        )
        for spec in STEPS
    ]
    finished_rows = Participant.objects.filter(
        study=study, state=State.COMPLETED, consented_at__isnull=False, finished_at__isnull=False
    )
    durations = [
        (finished - consented).total_seconds()
        for consented, finished in finished_rows.values_list("consented_at", "finished_at")
        if consented is not None and finished is not None  # the query's filter: narrows the types
    ]
    failed_attention = (
        Rating.objects.filter(
            item__participant__study=study,
            item__participant__state=State.COMPLETED,
            item__is_attention_check=True,
        )
        .exclude(choice=F("item__expected_choice"))
        .values("item__participant")
        .annotate(failures=Count("id"))
        .filter(failures__gt=study.attention_failures_allowed)
        .count()
    )
    return StudyDashboard(
        study_id=study.pk,
        participants=sum(by_state.values()),
        places_taken=study_places_taken(study=study),
        quota=study.quota,
        by_step=by_step,
        by_state=by_state,
        completed=by_state[State.COMPLETED],
        median_completion_s=statistics.median(durations) if durations else None,
        generation_failed=study_generation_failures(study=study).count(),
        failed_attention=failed_attention,
        excluded=sum(by_state[s] for s in Participant.EXCLUDED_STATES),
        ratings=study_counted_ratings(study=study).count(),
        win_rates=study_win_rates(study=study),
    )


STUDY_PARTICIPANTS_SHOWN = 100


def study_participants(*, study: Study, search: str = "") -> QuerySet[Participant]:
    """The study's participants, the most recently active first. `search` keeps the one it names: a
    recruitment id (PROLIFIC_PID, matched through its keyed hash), a SESSION_ID, or a token or its
    beginning (as the studio shows it)."""
    rows = Participant.objects.filter(study=study).order_by("-updated_at", "-pk")
    search = search.strip()
    if search:
        rows = rows.filter(
            Q(recruitment_id_hash=recruitment_id_hash(search))
            | Q(recruitment_session_id=search)
            | Q(token__startswith=search.lower())
        )
    return rows


def study_generation_failures(*, study: Study) -> QuerySet[Participant]:
    """Participants still waiting whose generation failed for good (each with its error), the longest
    waiting first: what a coordinator can retry."""
    return Participant.objects.filter(
        study=study, state=State.WAITING, generation=Participant.Generation.FAILED
    ).order_by("updated_at", "pk")


def study_dashboard_by_id(*, study_id: int) -> dict[str, Any] | None:
    study = Study.objects.filter(pk=study_id).first()
    return None if study is None else study_dashboard(study=study).to_json()


JOB_LOG_LINES_SHOWN = 200


def job_status(*, job: Job) -> dict[str, Any]:
    """What the job page needs to follow a job (its socket and polling endpoint send exactly this)."""
    return {
        "job_id": str(job.id),
        "kind": job.kind,
        "status": job.status,
        "finished": job.is_finished,
        "done": job.progress_done,
        "total": job.progress_total,
        "percent": job.percent,
        "stage": job.stage,
        "error": job.error,
        "log": "\n".join(job.log.splitlines()[-JOB_LOG_LINES_SHOWN:]),
    }


def job_status_by_id(*, job_id: str) -> dict[str, Any] | None:
    job = Job.objects.filter(pk=job_id).first()
    return None if job is None else job_status(job=job)


# How an evaluation job gives each study arm's method (modeling.evaluate.Arm: `:context` and `:cot`).
EVALUATION_ARM_OPTIONS = {  # keyed by the method's value, as Arm.method holds it
    Arm.Method.FSPO.value: "",
    Arm.Method.FSPO_COT.value: ":cot",
    Arm.Method.FEWSHOT.value: "",
    Arm.Method.NO_CONTEXT.value: ":none",
}


@dataclass(frozen=True)
class EvaluationDraft:
    """An evaluation job of a study's arms on held-out synthetic users, as the job form is prefilled:
    `initial` holds the form's fields, `left_out` says which arms an evaluation cannot run, and why."""

    initial: dict[str, Any]
    left_out: list[str]


def study_evaluation_draft(*, study: Study) -> EvaluationDraft:
    """The study's arms as an evaluation job: each arm's checkpoint folder with its method's options
    (served models, http(s):// specs, are left out: an evaluation loads checkpoint folders), the baseline
    of its first comparison, its N shots, a dataset of its domain from the data folder (if there is one),
    and an output name not used yet."""
    lines, left_out, names = [], [], []
    for arm in study.arms.order_by("id"):
        spec = arm.checkpoint
        if spec.startswith(("http://", "https://")):
            left_out.append(f"{arm.name}: {spec} is a served model; an evaluation loads checkpoint folders.")
            continue
        folder = spec.split(":", 1)[1] if spec.startswith(("hf:", "vllm:")) else spec
        lines.append(f"{arm.name}={relative_to_root(folder)}{EVALUATION_ARM_OPTIONS[arm.method]}")
        names.append(arm.name)
    comparison = study.comparisons.select_related("baseline").order_by("id").first()
    baseline = comparison.baseline.name if comparison and comparison.baseline.name in names else ""
    datasets = datasets_available(domain=study.domain)
    return EvaluationDraft(
        initial={
            "study": study.pk,
            "name": output_name_free(Job.Kind.EVALUATE, f"{study.slug}-arms"),
            "dataset": datasets[0] if datasets else "",
            "arms": "\n".join(lines),
            "baseline": baseline,
            "shots": study.n_pairs,
        },
        left_out=left_out,
    )


@dataclass(frozen=True)
class CrowdReport:
    """An imported study's crowd report as its analysis page shows it: its latest crowd_report job
    (`latest`, any status) and the report of its latest that succeeded (`shown`), read from that job's
    crowd.json: the crowd against each judge, the Bradley-Terry ranking with each judge's rank beside the
    crowd's, and the plots' file names in the job's folder."""

    latest: Job | None
    shown: Job | None = None
    judges: list[dict[str, Any]] = field(default_factory=list)
    judge_names: list[str] = field(default_factory=list)
    ranking: list[dict[str, Any]] = field(default_factory=list)
    spearman: dict[str, float | None] = field(default_factory=dict)
    judgments: int = 0
    plots: list[str] = field(default_factory=list)
    message: str = ""


def study_crowd_report(*, study: Study) -> CrowdReport:
    """The study's crowd report (above); a message instead of tables when the succeeded job's crowd.json
    is gone or unreadable."""
    from modeling.analysis.crowd import Ranking
    from modeling.analysis.crowd_report import CROWD_JSON, judge_ranks

    jobs = study.jobs.filter(kind=Job.Kind.CROWD_REPORT).order_by("-created_at")
    latest, shown = jobs.first(), jobs.filter(status=Job.Status.SUCCEEDED).first()
    if shown is None:
        return CrowdReport(latest=latest)
    folder = Path(shown.output_dir)
    try:
        data = json.loads((folder / CROWD_JSON).read_text())
        ranking = Ranking(**data["ranking"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        where = relative_to_root(folder / CROWD_JSON)
        return CrowdReport(latest=latest, shown=shown, message=f"{where} cannot be read ({exc}).")
    ranks = judge_ranks(ranking)
    rows = [
        {
            "rank": i + 1,
            "model": model,
            "score": ranking.crowd[i],
            "ci": (ranking.crowd_low[i], ranking.crowd_high[i]),
            "judge_ranks": [ranks[judge][model] for judge in ranking.judges],
        }
        for i, model in enumerate(ranking.models)
    ]
    return CrowdReport(
        latest=latest,
        shown=shown,
        judges=data["judges"],
        judge_names=list(ranking.judges),
        ranking=rows,
        spearman=ranking.spearman,
        judgments=ranking.judgments,
        plots=sorted(p.name for p in folder.glob("*.png")),
    )
