"""Studies, their arms, the participants who take them, and coordinators' background jobs.

Items and judgments (questions, candidate pairs, picks, generated responses, A/B ratings, surveys) live in
annotation/models.py.
"""

import secrets
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q
from django.utils import timezone


def stale_work_cutoff(now: datetime | None = None) -> datetime:
    """A generation or job whose last heartbeat is older than this has lost its worker:
    settings.STALE_WORK_AFTER_S before `now` (by default, now)."""
    return (now or timezone.now()) - timedelta(seconds=settings.STALE_WORK_AFTER_S)


class Study(models.Model):
    """One human study: what participants see, how many judgments they make, and what they are paid with.

    The question pool (annotation.Question and annotation.CandidatePair) and the arms hang off the study.
    """

    slug = models.SlugField(max_length=64, unique=True, help_text="The entry link is /s/<slug>/.")
    title = models.CharField(max_length=200)
    domain = models.CharField(
        max_length=64, help_text="The synthetic domain the pool comes from (reviews, elix, roleplay, ...)."
    )
    instruction = models.TextField(
        help_text="The task instruction the models are given under '# Task' (the domain's task text, "
        "exactly as in training)."
    )
    n_pairs = models.PositiveSmallIntegerField(
        default=9,
        validators=[MinValueValidator(1), MaxValueValidator(64)],
        help_text="Pairwise picks each participant makes: the few-shot examples the models see.",
    )
    n_eval_questions = models.PositiveSmallIntegerField(
        default=11,
        validators=[MinValueValidator(1), MaxValueValidator(200)],
        help_text="Held-out questions answered by every arm for each participant.",
    )
    consistency_repeats = models.PositiveSmallIntegerField(
        default=2, help_text="Rated pairs shown a second time, sides swapped (intra-user consistency)."
    )
    attention_checks = models.PositiveSmallIntegerField(default=1)
    attention_failures_allowed = models.PositiveSmallIntegerField(
        default=0, help_text="More failed attention checks than this gives the failed-attention code."
    )
    quota = models.PositiveIntegerField(
        default=50,
        help_text="Places: participants who are taking or have finished the study. Newcomers beyond it "
        "are screened out.",
    )
    consent_text = models.TextField()
    instructions_text = models.TextField(
        blank=True, help_text="Shown before the first pick; a standard text is shown when empty."
    )
    completion_code = models.CharField(max_length=64)
    screened_out_code = models.CharField(max_length=64, blank=True)
    failed_attention_code = models.CharField(max_length=64, blank=True)
    declined_code = models.CharField(max_length=64, blank=True)
    completion_url = models.URLField(
        max_length=500,
        blank=True,
        help_text="Where a finished participant is sent; '{code}' is replaced by their code, e.g. "
        "https://app.prolific.com/submissions/complete?cc={code}",
    )
    max_new_tokens = models.PositiveIntegerField(
        default=256, validators=[MinValueValidator(1), MaxValueValidator(4096)]
    )
    time_limit_minutes = models.PositiveIntegerField(
        default=60,
        validators=[MinValueValidator(1), MaxValueValidator(7 * 24 * 60)],
        help_text="A participant who has not finished and has done nothing for this long is timed out: "
        "they cannot go on, and their place is freed.",
    )
    is_open = models.BooleanField(default=False, help_text="Only an open study takes new participants.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "studies"
        ordering = ["-created_at"]

    # Domains of studies whose judgments were imported, not collected here (studyapp.services.imports):
    # their description (instructions_text) carries the source's attribution into every export.
    IMPORTED_DOMAINS = ("llmfao",)

    def __str__(self) -> str:
        return self.title or self.slug

    @property
    def is_imported(self) -> bool:
        """Whether the study holds judgments imported from elsewhere (nobody takes it on this site)."""
        return self.domain in self.IMPORTED_DOMAINS

    def clean(self) -> None:
        if self.attention_failures_allowed > self.attention_checks:
            raise ValidationError(
                {
                    "attention_failures_allowed": "Cannot allow more failures than there are attention checks "
                    f"({self.attention_checks})."
                }
            )


class Arm(models.Model):
    """A model checkpoint plus a method; participants never see which arm wrote a response."""

    class Method(models.TextChoices):
        FSPO = "fspo", "FSPO"
        FSPO_COT = "fspo_cot", "FSPO + user-description CoT"
        FEWSHOT = "fewshot", "few-shot prompting"
        NO_CONTEXT = "no_context", "no user context (base, SFT, IPO)"

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="arms")
    name = models.CharField(max_length=64, help_text="The coordinator's label (never shown to participants).")
    method = models.CharField(max_length=16, choices=Method.choices)
    checkpoint = models.CharField(
        max_length=500,
        help_text="A generation spec: a local model or adapter directory (or hf:/dir), vllm:/dir, or "
        "http(s)://host:port/v1#model.",
    )

    class Meta:
        constraints = [models.UniqueConstraint(fields=["study", "name"], name="arm_name_unique_in_study")]
        ordering = ["study", "name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_method_display()})"

    @property
    def uses_picks(self) -> bool:
        """Whether the participant's picks go into the prompt as few-shot examples."""
        return self.method != self.Method.NO_CONTEXT

    @property
    def cot(self) -> bool:
        """Whether the model writes a user description before the response."""
        return self.method == self.Method.FSPO_COT


class Comparison(models.Model):
    """One A/B pairing shown for every evaluation question: `arm` (e.g. FSPO) against `baseline`."""

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="comparisons")
    arm = models.ForeignKey(Arm, on_delete=models.CASCADE, related_name="+")
    baseline = models.ForeignKey(Arm, on_delete=models.CASCADE, related_name="+")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["study", "arm", "baseline"], name="comparison_unique"),
            models.CheckConstraint(condition=~Q(arm=F("baseline")), name="comparison_of_two_arms"),
        ]

    def __str__(self) -> str:
        return f"{self.arm.name} vs {self.baseline.name}"

    def clean(self) -> None:
        if self.arm_id and self.arm.study_id != self.study_id:
            raise ValidationError({"arm": "The arm belongs to another study."})
        if self.baseline_id and self.baseline.study_id != self.study_id:
            raise ValidationError({"baseline": "The baseline belongs to another study."})


def new_participant_token() -> str:
    return secrets.token_hex(16)


class Participant(models.Model):
    """One person taking one study, known only by pseudonyms.

    `token` is random: it names the participant in URLs, sockets and exports. A recruitment id
    (PROLIFIC_PID) is kept only as a keyed hash (`recruitment_id_hash`), so the same id always maps back
    to the same participant. No IP address or user agent is stored.

    Where they are in the study is `state` plus two counters; studyapp.flow turns that into the page to
    show. `updated_at` moves with every step they take, so it is when they were last active. `n_picks` and `n_ratings` are fixed when the items are assigned, so later edits of the study
    never move a participant who has started.
    """

    class State(models.TextChoices):
        CONSENT = "consent"
        INSTRUCTIONS = "instructions"
        ELICITATION = "elicitation"
        WAITING = "waiting"
        RATING = "rating"
        SURVEY = "survey"
        COMPLETED = "completed"
        WITHDRAWN = "withdrawn"
        DECLINED = "declined"
        SCREENED_OUT = "screened_out"
        RETURNED = "returned"  # the recruitment platform's "returned submission", set by a coordinator
        TIMED_OUT = "timed_out"  # inactive past the study's time limit (services.participants_expire)

    class Generation(models.TextChoices):
        NOT_STARTED = "not_started"
        QUEUED = "queued"
        RUNNING = "running"
        READY = "ready"
        FAILED = "failed"

    FINISHED_STATES = (
        State.COMPLETED,
        State.WITHDRAWN,
        State.DECLINED,
        State.SCREENED_OUT,
        State.RETURNED,
        State.TIMED_OUT,
    )
    # Finished without completing, judgments kept: the analyses leave their judgments out.
    EXCLUDED_STATES = (State.RETURNED, State.TIMED_OUT)
    # How long a queued generation may take to reach the broker before it counts as never sent.
    UNSENT_GRACE = timedelta(seconds=5)
    # How generation_error starts while their task waits for the broker to come back (then it is sent).
    NOT_SENT = "Not sent yet (the task queue could not be reached; it is sent once it is back): "
    # Hold no place in the quota: they never started, have left, or have been let go.
    PLACE_FREED_STATES = (State.WITHDRAWN, State.DECLINED, State.SCREENED_OUT, *EXCLUDED_STATES)

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="participants")
    token = models.CharField(max_length=32, unique=True, default=new_participant_token, editable=False)
    recruitment_id_hash = models.CharField(max_length=64, null=True, blank=True, editable=False)
    recruitment_study_id = models.CharField(max_length=64, blank=True, help_text="STUDY_ID")
    recruitment_session_id = models.CharField(max_length=64, blank=True, help_text="SESSION_ID")
    state = models.CharField(max_length=16, choices=State.choices, default=State.CONSENT)
    n_picks = models.PositiveSmallIntegerField(default=0)
    picks_done = models.PositiveSmallIntegerField(default=0)
    n_ratings = models.PositiveSmallIntegerField(default=0)
    ratings_done = models.PositiveSmallIntegerField(default=0)
    generation = models.CharField(max_length=16, choices=Generation.choices, default=Generation.NOT_STARTED)
    generation_error = models.TextField(blank=True, help_text="Why generation failed (coordinators only).")
    created_at = models.DateTimeField(auto_now_add=True)
    consented_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    # The quota place the participant holds (1..study.quota), taken when they consent and given back
    # when they leave (services.participants): a unique number per study, so the quota stays exact
    # without locking the study for every arrival. None: no place (not consented yet, or gone).
    place = models.PositiveIntegerField(null=True, blank=True, editable=False)
    # Their generation's last sign of life: set when a worker starts it and every few seconds while it
    # runs (services.personalization), so a generation whose worker died is found and queued again.
    generation_heartbeat_at = models.DateTimeField(null=True, blank=True, editable=False)
    # When their `personalize` task was handed to the broker; None while queued means it never was (the
    # broker was down, or the web process died first): the stale-work sweeper sends it.
    generation_sent_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["study", "recruitment_id_hash"],
                condition=Q(recruitment_id_hash__isnull=False),
                name="one_participant_per_recruitment_id",
            ),
            models.UniqueConstraint(
                fields=["study", "place"], condition=Q(place__isnull=False), name="one_participant_per_place"
            ),
            models.CheckConstraint(
                condition=Q(place__isnull=True)
                | ~Q(state__in=["withdrawn", "declined", "screened_out", "returned", "timed_out"]),
                name="no_place_once_gone",
            ),
            models.CheckConstraint(condition=Q(picks_done__lte=F("n_picks")), name="picks_done_lte_n"),
            models.CheckConstraint(condition=Q(ratings_done__lte=F("n_ratings")), name="ratings_done_lte_n"),
        ]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.token[:8]} ({self.state})"

    @property
    def is_finished(self) -> bool:
        return self.state in self.FINISHED_STATES

    @property
    def is_excluded(self) -> bool:
        """Whether the analyses leave this participant's judgments out (returned or timed out)."""
        return self.state in self.EXCLUDED_STATES

    @property
    def may_withdraw(self) -> bool:
        """Whether the participant can still withdraw from their pages. Not once the study has ended for
        them without their say (returned, timed out): those pages change nothing any more, and deleting
        their data is then a request to the researchers."""
        return self.state not in self.PLACE_FREED_STATES

    @property
    def may_be_returned(self) -> bool:
        """Whether a coordinator can mark the participant returned: they hold a place or have judgments."""
        return self.state not in (
            self.State.WITHDRAWN,
            self.State.DECLINED,
            self.State.SCREENED_OUT,
            self.State.RETURNED,
        )

    @property
    def may_retry_generation(self) -> bool:
        """Whether a coordinator can run the participant's generation again: it failed for good, is
        stuck (generation_is_stuck), or has been queued for longer than settings.STALE_WORK_AFTER_S
        (its task may be held by a worker that died before starting it; a second task for it is
        harmless, as only a queued generation starts), while they wait."""
        if self.state != self.State.WAITING:
            return False
        if self.generation == self.Generation.FAILED or self.generation_is_stuck():
            return True
        return self.generation == self.Generation.QUEUED and self.updated_at < stale_work_cutoff()

    @property
    def generation_is_delayed(self) -> bool:
        """Waiting on a task the broker could not take yet (it is sent once the broker is back)."""
        return (
            self.state == self.State.WAITING
            and self.generation == self.Generation.QUEUED
            and self.generation_sent_at is None
            and self.generation_error.startswith(self.NOT_SENT)
        )

    def generation_is_stuck(self, *, stale: datetime | None = None) -> bool:
        """Queued but never handed to the broker, or running with no heartbeat since `stale` (by default
        settings.STALE_WORK_AFTER_S ago): its worker is gone, or its task never left."""
        now = timezone.now()
        if self.generation == self.Generation.QUEUED:
            # One queued a moment ago may still be on its way to the broker (its on_commit callback).
            unsent = self.generation_sent_at is None
            return unsent and (self.generation_is_delayed or self.updated_at < now - self.UNSENT_GRACE)
        if self.generation != self.Generation.RUNNING:
            return False
        stale = stale or stale_work_cutoff(now)
        return self.generation_heartbeat_at is None or self.generation_heartbeat_at < stale


class Job(models.Model):
    """A coordinator's background job (synthetic generation, training, evaluation, an imported crowd's
    report) and its progress.

    `params` are the validated inputs the worker runs with (studyapp.services.job_launch); `output_dir` is
    where the job writes (a dataset, a checkpoint, or an evaluation run with its report.md and plots);
    `log` holds timestamped lines, one per event; `result` the metrics the modeling entry point returned.
    Its id names the channel-layer group its progress goes to (studyapp.realtime.job_group)."""

    class Kind(models.TextChoices):
        SYNTH = "synth", "synthetic generation"
        TRAIN = "train", "training"
        EVALUATE = "evaluate", "evaluation"
        CROWD_REPORT = "crowd_report", "crowd report"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    study = models.ForeignKey(Study, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    params = models.JSONField(default=dict, blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    progress_done = models.PositiveIntegerField(default=0)
    progress_total = models.PositiveIntegerField(default=0)
    stage = models.CharField(max_length=200, blank=True)
    output_dir = models.CharField(max_length=500, blank=True)
    log = models.TextField(blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The running job's last sign of life (its progress, or a beat every few seconds): a running job
    # silent for longer than settings.STALE_WORK_AFTER_S lost its worker and is queued again.
    heartbeat_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.id} ({self.status})"

    def is_lost(self, *, stale: datetime | None = None) -> bool:
        """Running with no heartbeat since `stale` (by default stale_work_cutoff()): its worker is gone."""
        stale = stale or stale_work_cutoff()
        return self.status == self.Status.RUNNING and (self.heartbeat_at is None or self.heartbeat_at < stale)

    @property
    def name(self) -> str:
        """The coordinator's name for the job's output (the last part of its output directory)."""
        return str(self.params.get("name", "")) or str(self.id)[:8]

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.SUCCEEDED, self.Status.FAILED)

    @property
    def percent(self) -> int:
        if self.status == self.Status.SUCCEEDED:
            return 100
        if not self.progress_total:
            return 0
        return min(100, 100 * self.progress_done // self.progress_total)
