"""Judgments made outside the site loaded into a study, so the analysis page, the exports and their plots
run on them unchanged: the LLMFAO crowd (modeling.llmfao).

The mapping: the study's arms are the models (method no_context, checkpoint ``imported:llmfao:<model>``);
a comparison for every pair of models the crowd judged at least `min_pair_judgments` times (the arm is the
first by name); the evaluation questions are the prompts; a participant per worker, completed, marked
imported (recruitment study id ``llmfao``, session ``imported``), with no quota place and no consent; their
responses are the models' answers, an A/B item per judgment with its sides as shown, and a rating on each
item that chose a side. A tie has no rating (a Rating always has a side): it stays an item shown and never
rated, so the participant's ratings_done counts their decisive judgments and n_ratings all of them.
"""

import tempfile
from collections import Counter
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from annotation.models import Question, Side
from annotation.pool import PoolRow
from annotation.writers import ImportedRating, imported_ratings_create, question_pool_import
from modeling.llmfao import CrowdJudgment, ImportedCrowd, default_source, import_llmfao, read_imported
from modeling.synth.storage import DatasetError
from studyapp.datastore import output_name_free
from studyapp.models import Job, Participant, Study
from studyapp.pseudonyms import recruitment_id_hash

from .jobs import ACTIVE_JOB_STATES, job_launch
from .studies import ArmSpec, study_create

IMPORTED_STUDY_ID = "llmfao"  # Participant.recruitment_study_id of an imported worker
IMPORTED_SESSION = "imported"  # and their recruitment_session_id: how an imported participant is told apart
FINGERPRINT = "Source fingerprint: "  # the line of the study's description that names its source files
CONSENT = (
    "Imported judgments: these workers took part in LLMFAO's crowdsourcing, not on this site; "
    "there is no consent page and no quota place."
)
DEFAULT_MIN_PAIR_JUDGMENTS = 20
LLMFAO_SLUG = "llmfao-crowd"  # the study the studio's one-click import makes


@dataclass(frozen=True)
class CrowdStudyImported:
    """What crowd_study_import did: the study, and whether it was created now (False: it was there)."""

    study: Study
    created: bool
    participants: int = 0
    items: int = 0
    ratings: int = 0
    ties: int = 0


def crowd_description(crowd: ImportedCrowd) -> str:
    """The study's description (its instructions_text, exported in the study table): the attribution,
    the license and the fingerprint of the source files."""
    return (
        f"Imported crowd judgments, not collected on this site. {crowd.attribution}\n"
        f"License: {crowd.license}. A tie is an A/B item without a rating; imported ratings have "
        "strength 3 (LLMFAO records none) and no timing.\n"
        f"{FINGERPRINT}{crowd.fingerprint}"
    )


def _arm_name(crowd: ImportedCrowd, response_id: int) -> str:
    return crowd.responses[response_id][0]


def _comparisons(crowd: ImportedCrowd, min_pair_judgments: int) -> list[tuple[str, str]]:
    counts = Counter(
        tuple(sorted((_arm_name(crowd, j.left_id), _arm_name(crowd, j.right_id)))) for j in crowd.judgments
    )
    return [(a, b) for (a, b), n in sorted(counts.items()) if n >= min_pair_judgments]


def _study_fields(crowd: ImportedCrowd, slug: str, title: str) -> dict[str, object]:
    return {
        "slug": slug,
        "title": title,
        "domain": Study.IMPORTED_DOMAINS[0],
        "instruction": "Imported: each model answered the prompt as given (no FSPO instruction).",
        "n_pairs": 1,
        "n_eval_questions": len(crowd.prompts),
        "consistency_repeats": 0,
        "attention_checks": 0,
        "attention_failures_allowed": 0,
        "quota": len({j.worker for j in crowd.judgments}),
        "consent_text": CONSENT,
        "instructions_text": crowd_description(crowd),
        "completion_code": "imported",
        "is_open": False,
    }


def _existing(slug: str, crowd: ImportedCrowd) -> CrowdStudyImported | None:
    study = Study.objects.filter(slug=slug).first()
    if study is None:
        return None
    if study.is_imported and f"{FINGERPRINT}{crowd.fingerprint}" in study.instructions_text:
        return CrowdStudyImported(study=study, created=False)
    raise ValidationError(
        f"A study '{slug}' exists already and was not imported from these files: nothing was written "
        "(choose another --study, or delete that study first)."
    )


def _ratings(
    crowd: ImportedCrowd,
    judgments: list[tuple[int, CrowdJudgment]],
    arms: dict[str, int],
    questions: dict[int, int],
) -> list[ImportedRating]:
    position = {index: i for i, (index, _) in enumerate(judgments)}
    choice = {"left": Side.LEFT, "right": Side.RIGHT, "tie": ""}
    return [
        ImportedRating(
            question_id=questions[j.question_id],
            left_arm_id=arms[_arm_name(crowd, j.left_id)],
            left_text=crowd.responses[j.left_id][2],
            right_arm_id=arms[_arm_name(crowd, j.right_id)],
            right_text=crowd.responses[j.right_id][2],
            choice=choice[j.winner],
            repeat_of=None if j.repeat_of is None else position[j.repeat_of],
        )
        for _, j in judgments
    ]


def _workers_create(*, study: Study, crowd: ImportedCrowd) -> int:
    """A completed, imported participant per worker with their rows; returns how many ratings."""
    questions = {int(q.source_id): q.pk for q in Question.objects.filter(study=study)}
    arms = {arm.name: arm.pk for arm in study.arms.all()}
    now = timezone.now()
    ratings = 0
    by_worker = sorted(enumerate(crowd.judgments), key=lambda ij: (ij[1].worker, ij[0]))
    for worker, group in groupby(by_worker, key=lambda ij: ij[1].worker):
        judgments = list(group)
        participant = Participant.objects.create(
            study=study,
            recruitment_id_hash=recruitment_id_hash(f"{IMPORTED_STUDY_ID}-worker-{worker}"),
            recruitment_study_id=IMPORTED_STUDY_ID,
            recruitment_session_id=IMPORTED_SESSION,
            state=Participant.State.COMPLETED,
            n_ratings=len(judgments),
            ratings_done=sum(j.winner != "tie" for _, j in judgments),
            finished_at=now,
        )
        ratings += imported_ratings_create(
            participant=participant, ratings=_ratings(crowd, judgments, arms, questions), answered_at=now
        )
    return ratings


def crowd_study_import(
    *,
    crowd: ImportedCrowd,
    slug: str,
    title: str = "LLMFAO crowd (imported)",
    min_pair_judgments: int = DEFAULT_MIN_PAIR_JUDGMENTS,
) -> CrowdStudyImported:
    """Load an imported crowd (modeling.llmfao.read_imported) into a new, closed study `slug`, in one
    transaction (the mapping is in this module's docstring). Importing the same files into the same slug
    again changes nothing (created False); a slug taken by any other study raises ValidationError, and so
    does anything the study's own checks refuse: nothing is written then."""
    with transaction.atomic():
        existing = _existing(slug, crowd)
        if existing is not None:
            return existing
        models = sorted({name for name, _, _ in crowd.responses.values()})
        try:
            study = study_create(
                fields=_study_fields(crowd, slug, title),
                arms=[
                    ArmSpec(name=m, method="no_context", checkpoint=f"imported:llmfao:{m}") for m in models
                ],
                comparisons=_comparisons(crowd, min_pair_judgments),
            )
        except IntegrityError:  # another import created the slug between the check above and this insert
            raise ValidationError(
                f"A study '{slug}' was created by another import at the same time: nothing was written."
            ) from None
        rows = [
            PoolRow(kind=Question.Use.EVALUATION, question=text, topic=topic, source_id=str(qid))
            for qid, (topic, text) in sorted(crowd.prompts.items())
        ]
        question_pool_import(study=study, rows=rows)
        ratings = _workers_create(study=study, crowd=crowd)
        items = len(crowd.judgments)
        return CrowdStudyImported(
            study=study,
            created=True,
            participants=study.participants.count(),
            items=items,
            ratings=ratings,
            ties=items - ratings,
        )


def llmfao_study_import(*, source: Path | None = None, slug: str = LLMFAO_SLUG) -> CrowdStudyImported:
    """The studio's one click: the LLMFAO source files (``source``, default modeling.llmfao.default_source:
    $FSPO_LLMFAO_DIR or the shared folder) converted (``fspo data import llmfao``, into a temporary folder)
    and loaded into the study `slug` by crowd_study_import, with its defaults. ValidationError, with
    nothing written, when the files are not found or not LLMFAO's, or the slug is another study's."""
    folder = source if source is not None else default_source()
    try:
        with tempfile.TemporaryDirectory(prefix="llmfao-") as tmp:
            import_llmfao(folder, Path(tmp) / "llmfao")
            crowd = read_imported(Path(tmp) / "llmfao")
    except DatasetError as e:
        raise ValidationError(
            f"The LLMFAO data could not be imported: {e}. Put the LLMFAO files there, or set "
            "FSPO_LLMFAO_DIR to the folder that holds them. Nothing was written."
        ) from None
    return crowd_study_import(crowd=crowd, slug=slug)


def crowd_report_launch(*, study: Study, created_by: Any = None) -> Job:
    """The imported study's crowd report as a job (kind crowd_report, on the CPU queue): the LLMFAO files
    (the import's source) analysed as `fspo analyze crowd` does, no LLM judge and no model rows, into
    crowd-reports/<slug>[-N] of the data folder. A crowd report of the study already queued or running is
    returned instead of a second one. ValidationError for a study that is not imported, or when the
    LLMFAO files are not found (job_launch checks them)."""
    if not study.is_imported:
        raise ValidationError(f"{study.title} holds no imported crowd: there is no crowd report to compute.")
    with transaction.atomic():
        active = study.jobs.select_for_update().filter(
            kind=Job.Kind.CROWD_REPORT, status__in=ACTIVE_JOB_STATES
        )
        if (running := active.first()) is not None:
            return running
        name = output_name_free(Job.Kind.CROWD_REPORT, study.slug)
        return job_launch(
            kind=Job.Kind.CROWD_REPORT, params={"name": name}, study=study, created_by=created_by
        )
