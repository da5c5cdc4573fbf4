"""Creating and changing studies from the coordinators' studio: settings, arms, comparisons and the
question pool together, in one transaction."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from annotation.models import CandidatePair, GeneratedResponse, Question
from annotation.pool import PoolSource
from annotation.writers import question_pool_import
from studyapp.models import Arm, Comparison, Study
from studyapp.study_fields import STUDY_FIELDS

from .participants import places_compact


@dataclass(frozen=True)
class ArmSpec:
    """An arm as the coordinator gives it: a name, a method (Arm.Method) and a checkpoint spec."""

    name: str
    method: str
    checkpoint: str


def study_create(
    *,
    fields: Mapping[str, Any],
    arms: Sequence[ArmSpec] = (),
    comparisons: Sequence[tuple[str, str]] = (),
    pool: PoolSource | None = None,
    created_by: Any = None,
) -> Study:
    """Create a study with its arms, its comparisons (arm name, baseline name) and its question pool, in
    one transaction. `fields` are Study fields (STUDY_FIELDS); an empty domain or instruction is taken
    from the pool when it comes from a synthetic dataset. Raises ValidationError (keyed by field where
    there is one) and creates nothing when anything is wrong, including opening a study that cannot run."""
    with transaction.atomic():
        study = Study(created_by=created_by)
        _study_set_fields(study, fields, pool)
        study.save()
        _arms_sync(study, arms)
        _comparisons_set(study, comparisons)
        if pool is not None:
            question_pool_import(study=study, rows=pool.rows)
        _check_ready_to_open(study)
        return study


def study_update(
    *,
    study: Study,
    fields: Mapping[str, Any],
    arms: Sequence[ArmSpec],
    comparisons: Sequence[tuple[str, str]],
    pool: PoolSource | None = None,
    replace_pool: bool = True,
) -> Study:
    """Change a study's settings, arms and comparisons, and import a question pool if one is given
    (replacing the current one, or added to it), in one transaction: all of it or nothing.

    Arms are matched by name. An arm that has already written responses for participants can be neither
    removed nor pointed at another method or checkpoint (their ratings would lose their meaning), and a
    pool that participants have seen cannot be replaced: each raises ValidationError."""
    with transaction.atomic():
        study = Study.objects.select_for_update().get(pk=study.pk)
        quota_before = study.quota
        _study_set_fields(study, fields, pool)
        study.save()
        if study.quota < quota_before:
            places_compact(study=study)
        _arms_sync(study, arms)
        _comparisons_set(study, comparisons)
        if pool is not None:
            question_pool_import(study=study, rows=pool.rows, replace=replace_pool)
        _check_ready_to_open(study)
        return study


def _study_set_fields(study: Study, fields: Mapping[str, Any], pool: PoolSource | None) -> None:
    unknown = set(fields) - set(STUDY_FIELDS)
    if unknown:
        raise ValueError(f"not study fields: {', '.join(sorted(unknown))}")
    for name, value in fields.items():
        setattr(study, name, value)
    if pool is not None:
        study.domain = study.domain or pool.domain
        study.instruction = study.instruction or pool.instruction
    problems: dict[str, list[str]] = {}
    if not study.domain:
        problems["domain"] = ["Give the domain, or import a synthetic dataset (its domain is used)."]
    if not study.instruction:
        problems["instruction"] = [
            "Give the task instruction, or import a synthetic dataset (its task text is used)."
        ]
    try:
        study.full_clean(exclude=["created_by", *problems])
    except ValidationError as exc:
        for field, messages in exc.message_dict.items():
            problems.setdefault(field, []).extend(messages)
    if problems:
        raise ValidationError(problems)


def _arm_spec_problems(arms: Sequence[ArmSpec]) -> list[str]:
    """What is wrong with the arms as given, before they are compared with the study's."""
    problems = []
    names = [spec.name for spec in arms]
    for spec in arms:
        if not spec.name or len(spec.name) > 64:
            problems.append("Every arm needs a name of at most 64 characters.")
        if spec.method not in Arm.Method.values:
            problems.append(f"Arm '{spec.name}': the method must be one of {', '.join(Arm.Method.values)}.")
        if not spec.checkpoint.strip() or len(spec.checkpoint) > 500:
            problems.append(f"Arm '{spec.name}': give a checkpoint spec (at most 500 characters).")
    problems += [f"Two arms are named '{name}'." for name in sorted({n for n in names if names.count(n) > 1})]
    return problems


def _arms_sync(study: Study, arms: Sequence[ArmSpec]) -> None:
    problems = _arm_spec_problems(arms)
    existing = {arm.name: arm for arm in study.arms.all()}
    used = set(GeneratedResponse.objects.filter(arm__study=study).values_list("arm_id", flat=True).distinct())
    for spec in arms:
        arm = existing.pop(spec.name, None)
        if arm is None or (arm.method, arm.checkpoint) == (spec.method, spec.checkpoint.strip()):
            continue
        if arm.pk in used:
            problems.append(
                f"Arm '{arm.name}' has already written responses for participants: its method and "
                "checkpoint can no longer change (add a new arm instead)."
            )
    problems += [
        f"Arm '{arm.name}' has already written responses for participants and cannot be removed."
        for arm in existing.values()
        if arm.pk in used
    ]
    if problems:
        raise ValidationError(problems)
    Arm.objects.filter(pk__in=[arm.pk for arm in existing.values()]).delete()
    for spec in arms:
        Arm.objects.update_or_create(
            study=study,
            name=spec.name,
            defaults={"method": spec.method, "checkpoint": spec.checkpoint.strip()},
        )


def _comparisons_set(study: Study, comparisons: Sequence[tuple[str, str]]) -> None:
    arms = {arm.name: arm for arm in study.arms.all()}
    known = ", ".join(sorted(arms)) or "none yet"
    problems, seen = [], set()
    for number, (arm, baseline) in enumerate(comparisons, start=1):
        for name in (arm, baseline):
            if name not in arms:
                problems.append(f"Comparison {number}: there is no arm named '{name}' (arms: {known}).")
        if arm == baseline:
            problems.append(f"Comparison {number}: an arm cannot be compared with itself.")
        elif (arm, baseline) in seen:
            problems.append(f"Comparison {number}: {arm} against {baseline} is listed twice.")
        seen.add((arm, baseline))
    if problems:
        raise ValidationError(problems)
    study.comparisons.all().delete()
    Comparison.objects.bulk_create(
        Comparison(study=study, arm=arms[arm], baseline=arms[baseline]) for arm, baseline in comparisons
    )


def _check_ready_to_open(study: Study) -> None:
    """An open study must be able to run for every newcomer: enough pairs and questions, a comparison."""
    if not study.is_open:
        return
    pairs = CandidatePair.objects.filter(
        question__study=study, question__use=Question.Use.ELICITATION
    ).count()
    questions = Question.objects.filter(study=study, use=Question.Use.EVALUATION).count()
    problems = []
    if pairs < study.n_pairs:
        problems.append(
            f"The pool has {pairs} elicitation pair(s); each participant makes {study.n_pairs} picks."
        )
    if questions < study.n_eval_questions:
        problems.append(
            f"The pool has {questions} evaluation question(s); each participant gets {study.n_eval_questions}."
        )
    if not study.comparisons.exists():
        problems.append("There is no comparison (an arm against a baseline) to rate.")
    if problems:
        raise ValidationError({"is_open": ["The study cannot open yet.", *problems]})
