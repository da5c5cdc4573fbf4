"""The coordinators' studio (/studio/): studies (create, edit, live dashboard) and jobs (launch, follow,
results). Views that change something are for coordinators only, views that only show are for analysts
too (studyapp.coordinators); each only translates HTTP: a form parses, a service writes, a selector reads."""

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from annotation.models import CandidatePair, Question
from studyapp.coordinators import coordinator_required, is_coordinator, studio_viewer_required
from studyapp.datastore import checkpoints_available, datasets_available, relative_to_root
from studyapp.models import Job, Participant, Study
from studyapp.realtime import live_socket_path
from studyapp.reports import report_blocks
from studyapp.selectors import (
    STUDY_PARTICIPANTS_SHOWN,
    job_status,
    studies_overview,
    study_dashboard,
    study_evaluation_draft,
    study_generation_failures,
    study_participants,
)
from studyapp.services import (
    job_launch,
    participant_generation_retry,
    participant_mark_returned,
    study_create,
    study_update,
)
from studyapp.services.imports import llmfao_study_import
from studyapp.studio_forms import JOB_FORMS, JobForm, StudyEditor

RECENT_JOBS = 25
# What Prolific substitutes into a study URL (other platforms have their own placeholders).
PROLIFIC_PARAMS = "?PROLIFIC_PID={{%PROLIFIC_PID%}}&STUDY_ID={{%STUDY_ID%}}&SESSION_ID={{%SESSION_ID%}}"
# The files of a job's output folder that its page may show: the plots an evaluation writes.
SHOWN_FILE = re.compile(r"^[\w.-]+\.png$")


def _posted(request: HttpRequest) -> Any:
    return request.POST if request.method == "POST" else None


def _pickers() -> dict[str, Any]:
    """What the datalists offer: the datasets and checkpoints in the data folder, the built-in domains."""
    from modeling.synth import BUILTIN_DOMAINS

    return {
        "datasets": datasets_available(),
        "checkpoints": checkpoints_available(),
        "domains": BUILTIN_DOMAINS,
    }


@studio_viewer_required
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    jobs = Job.objects.select_related("study", "created_by").order_by("-created_at")[:RECENT_JOBS]
    return render(request, "studio/home.html", {"studies": studies_overview(), "jobs": jobs})


def _study_page(request: HttpRequest, editor: StudyEditor, study: Study | None) -> HttpResponse:
    pool = None
    if study is not None:
        pool = {
            "elicitation_questions": Question.objects.filter(
                study=study, use=Question.Use.ELICITATION
            ).count(),
            "elicitation_pairs": CandidatePair.objects.filter(question__study=study).count(),
            "evaluation_questions": Question.objects.filter(study=study, use=Question.Use.EVALUATION).count(),
        }
    context = {"editor": editor, "study": study, "pool": pool, **_pickers()}
    status = 400 if request.method == "POST" else 200
    return render(request, "studio/study_form.html", context, status=status)


@coordinator_required
@require_http_methods(["GET", "POST"])
def new_study(request: HttpRequest) -> HttpResponse:
    editor = StudyEditor(_posted(request), request.FILES or None)
    if request.method == "POST" and editor.is_valid():
        try:
            study = study_create(
                fields=editor.fields(),
                arms=editor.arm_specs(),
                comparisons=editor.comparison_pairs(),
                pool=editor.pool_source(),
                created_by=request.user,
            )
        except ValidationError as exc:
            editor.add_error(exc)
        else:
            messages.success(request, f"Created {study.title}.")
            return redirect("studio-study", slug=study.slug)
    return _study_page(request, editor, None)


@coordinator_required
@require_http_methods(["GET", "POST"])
def edit_study(request: HttpRequest, slug: str) -> HttpResponse:
    study = get_object_or_404(Study, slug=slug)
    editor = StudyEditor(_posted(request), request.FILES or None, study=study)
    if request.method == "POST" and editor.is_valid():
        try:
            study = study_update(
                study=study,
                fields=editor.fields(),
                arms=editor.arm_specs(),
                comparisons=editor.comparison_pairs(),
                pool=editor.pool_source(),
                replace_pool=editor.replace_pool(),
            )
        except ValidationError as exc:
            editor.add_error(exc)
        else:
            messages.success(request, f"Saved {study.title}.")
            return redirect("studio-study", slug=study.slug)
    # The form changed the instance it was bound to; show the saved study's name and links.
    return _study_page(request, editor, Study.objects.get(pk=study.pk))


@studio_viewer_required
@require_GET
def dashboard(request: HttpRequest, slug: str) -> HttpResponse:
    study = get_object_or_404(Study, slug=slug)
    search = request.GET.get("participant", "").strip()[:100]
    participants = study_participants(study=study, search=search)
    context = {
        "study": study,
        "dashboard": study_dashboard(study=study).to_json(),
        "failures": study_generation_failures(study=study),
        "participants": participants[:STUDY_PARTICIPANTS_SHOWN],
        "participants_total": participants.count(),
        "participants_shown": STUDY_PARTICIPANTS_SHOWN,
        "search": search,
        "can_change_participants": is_coordinator(request.user),
        "entry_url": request.build_absolute_uri(reverse("participant-entry", kwargs={"slug": study.slug}))
        + PROLIFIC_PARAMS,
        "socket_path": live_socket_path(f"/ws/studies/{study.slug}/dashboard/"),
        "poll_url": reverse("studio-study-dashboard-json", kwargs={"slug": study.slug}),
        "arms": study.arms.order_by("name"),
        "jobs": study.jobs.order_by("-created_at")[:RECENT_JOBS],
        "pool": {
            "elicitation_pairs": CandidatePair.objects.filter(question__study=study).count(),
            "evaluation_questions": Question.objects.filter(study=study, use=Question.Use.EVALUATION).count(),
        },
    }
    return render(request, "studio/dashboard.html", context)


@coordinator_required
@require_POST
def import_llmfao(request: HttpRequest) -> HttpResponse:
    """One click: the LLMFAO crowd (the shared files, or $FSPO_LLMFAO_DIR) into the study llmfao-crowd as
    imported judgments (about 20 s on the whole crowd, in the request: it is shorter than a job's start)."""
    try:
        done = llmfao_study_import()
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("studio-home")
    if done.created:
        messages.success(
            request,
            f"Imported the LLMFAO crowd: {done.participants} workers, {done.items} judgments "
            f"({done.ratings} ratings, {done.ties} ties).",
        )
    else:
        messages.info(request, f"The study {done.study.slug} holds this import already: nothing changed.")
    return redirect("studio-study", slug=done.study.slug)


def _study_participant(slug: str, token: str) -> Participant:
    return get_object_or_404(Participant.objects.select_related("study"), study__slug=slug, token=token)


def _participant_action(
    request: HttpRequest, slug: str, token: str, action: Callable[..., Any], done: str
) -> HttpResponse:
    """Run a coordinator's action on one participant; its refusal (ValidationError) becomes the message."""
    participant = _study_participant(slug, token)
    try:
        action(participant=participant)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, done.format(who=f"Participant {token[:8]}"))
    return redirect(reverse("studio-study", kwargs={"slug": slug}) + "#participants")


@coordinator_required
@require_POST
def participant_return(request: HttpRequest, slug: str, token: str) -> HttpResponse:
    """Mark a participant returned (their recruitment platform says they returned the submission)."""
    return _participant_action(
        request,
        slug,
        token,
        participant_mark_returned,
        "{who} is marked returned: their place is free again.",
    )


@coordinator_required
@require_POST
def participant_retry_generation(request: HttpRequest, slug: str, token: str) -> HttpResponse:
    """Run a participant's failed generation again; their waiting page moves on by itself."""
    return _participant_action(
        request, slug, token, participant_generation_retry, "Generation for {who} is queued again."
    )


@never_cache
@studio_viewer_required
@require_GET
def dashboard_json(request: HttpRequest, slug: str) -> JsonResponse:
    """The dashboard's polling fallback: the same payload its socket sends."""
    study = get_object_or_404(Study, slug=slug)
    return JsonResponse(study_dashboard(study=study).to_json())


@coordinator_required
@require_http_methods(["GET", "POST"])
def new_job(request: HttpRequest, kind: str) -> HttpResponse:
    if kind not in JOB_FORMS:
        raise Http404("no such kind of job")
    initial = {"study": request.GET.get("study")} if request.GET.get("study") else None
    left_out: list[str] = []
    if kind == Job.Kind.EVALUATE and request.method == "GET" and initial:
        # From a study's page: its arms, evaluated on held-out synthetic users.
        study = Study.objects.filter(pk=initial["study"]).first() if initial["study"].isdigit() else None
        if study is not None:
            draft = study_evaluation_draft(study=study)
            initial, left_out = draft.initial, draft.left_out
    form: JobForm = JOB_FORMS[kind](_posted(request), initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            job = job_launch(
                kind=kind, params=form.params(), study=form.cleaned_data["study"], created_by=request.user
            )
        except ValidationError as exc:
            _form_errors(form, exc)
        else:
            return redirect("studio-job", job_id=job.pk)
    context = {
        "form": form,
        "kind": kind,
        "kind_label": Job.Kind(kind).label,
        "left_out": left_out,
        **_pickers(),
    }
    return render(request, "studio/job_form.html", context, status=400 if request.method == "POST" else 200)


def _form_errors(form: JobForm, exc: ValidationError) -> None:
    if not hasattr(exc, "error_dict"):
        form.add_error(None, exc)
        return
    for field, errors in exc.message_dict.items():
        form.add_error(field if field in form.fields else None, errors)


def _job_results(job: Job) -> dict[str, Any]:
    """What the job page shows under its progress once the job has succeeded."""
    if job.status != Job.Status.SUCCEEDED or not job.result:
        return {}
    out = Path(job.output_dir)
    if job.kind in (Job.Kind.EVALUATE, Job.Kind.CROWD_REPORT):
        report = out / "report.md"
        blocks = report_blocks(report.read_text()) if report.is_file() else []
        for_page = []
        for block in blocks:
            if block.kind == "image":
                if not (SHOWN_FILE.match(block.src) and (out / block.src).is_file()):
                    continue
                url = reverse("studio-job-file", kwargs={"job_id": job.pk, "name": block.src})
                for_page.append({"block": block, "url": url})
            else:
                for_page.append({"block": block})
        return {"report": for_page, "report_path": relative_to_root(report)}
    if job.kind == Job.Kind.TRAIN:
        history = job.result.get("history", [])
        columns = list(dict.fromkeys(key for row in history for key in row))  # step 0 has fewer keys
        return {
            "final": job.result.get("final", {}),
            "history_columns": columns,
            "history_rows": [[row.get(c) for c in columns] for row in history],
        }
    return {
        "counts": job.result.get("counts", {}),
        "quality": {k: v for k, v in job.result.get("quality", {}).items() if not isinstance(v, list | dict)},
    }


@studio_viewer_required
@require_GET
def job_page(request: HttpRequest, job_id: str) -> HttpResponse:
    job = get_object_or_404(Job.objects.select_related("study", "created_by"), pk=job_id)
    context = {
        "job": job,
        "status": job_status(job=job),
        "output": relative_to_root(job.output_dir) if job.output_dir else "",
        "socket_path": live_socket_path(f"/ws/jobs/{job.pk}/"),
        "poll_url": reverse("studio-job-status", kwargs={"job_id": job.pk}),
        **_job_results(job),
    }
    return render(request, "studio/job.html", context)


@never_cache
@studio_viewer_required
@require_GET
def job_status_json(request: HttpRequest, job_id: str) -> JsonResponse:
    """The job page's polling fallback: the same payload its socket sends."""
    job = get_object_or_404(Job, pk=job_id)
    return JsonResponse(job_status(job=job))


@studio_viewer_required
@require_GET
def job_file(request: HttpRequest, job_id: str, name: str) -> FileResponse:
    """A plot from the job's output folder (only PNG files directly in it)."""
    job = get_object_or_404(Job, pk=job_id)
    if not job.output_dir or not SHOWN_FILE.match(name):
        raise Http404("no such file")
    path = Path(job.output_dir) / name
    if not path.is_file():
        raise Http404("no such file")
    return FileResponse(path.open("rb"), content_type="image/png")
