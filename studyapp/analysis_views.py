"""The studio's analysis page of a study (annotation.analysis, modeling.analysis): every analysis with its
table, plot, rules and messages, computed from the study's current data, and the same report as a zip
(report.md, analysis.json, PNGs) — what `fspo analyze` writes from an export. Coordinators and analysts
only (studyapp.coordinators), like the export page.

The synthetic side is chosen in the page's form: an `fspo eval` results.json and a synthetic dataset,
both inside the studio's data folder (studyapp.datastore); the exclusion rules can be changed there too.
"""

import base64
import io
import zipfile
from pathlib import Path
from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from annotation.analysis import study_analysis
from annotation.exports import EXPORT_SCHEMA_VERSION, NothingToExport
from modeling.analysis import (
    AnalysisInputError,
    AnalysisOptions,
    ExclusionRules,
    StudyAnalysis,
    SyntheticEval,
    SyntheticInputs,
    read_synthetic_eval,
    report_files,
    synthetic_inputs,
)
from modeling.synth import DatasetError
from studyapp.coordinators import coordinator_required, is_coordinator, studio_viewer_required
from studyapp.datastore import (
    OUTPUT_FOLDERS,
    data_root,
    datasets_available,
    relative_to_root,
    resolve_in_data_root,
)
from studyapp.models import Study
from studyapp.selectors import study_crowd_report
from studyapp.services.imports import crowd_report_launch
from studyapp.studio_forms import datalist_input


def evaluations_available() -> list[str]:
    """Evaluation runs in the data folder's evaluations/ that have a results.json (relative paths)."""
    base = data_root() / OUTPUT_FOLDERS["evaluate"]
    if not base.is_dir():
        return []
    return [relative_to_root(p) for p in sorted(base.iterdir()) if (p / "results.json").is_file()]


def _data_folder_path(label: str, folder: str, help_text: str) -> forms.CharField:
    """An optional path inside the data folder's `folder`, suggested from the page's datalist of it."""
    widget = datalist_input(folder)
    widget.attrs["placeholder"] = f"{folder}/<name>"
    return forms.CharField(required=False, label=label, help_text=help_text, widget=widget)


class AnalysisForm(forms.Form):
    """What the page compares with and whom it counts. Paths are inside the data folder."""

    evaluation = _data_folder_path(
        "Synthetic evaluation",
        "evaluations",
        "An evaluation run of these arms' checkpoints (its folder or results.json), for the "
        "synthetic-to-real table.",
    )
    dataset = _data_folder_path(
        "Synthetic dataset",
        "datasets",
        "A dataset of the study's domain: its personas and self-consistency. Without one, the domain's "
        "persona weights are used.",
    )
    too_fast_ms = forms.IntegerField(
        required=False,
        min_value=0,
        label="Too fast under (ms)",
        help_text="Median time per A/B answer; empty: the export's 2,000 ms; 0 turns the rule off.",
    )
    keep_failed_attention = forms.BooleanField(
        required=False, label="Count participants who failed attention"
    )
    keep_returned = forms.BooleanField(required=False, label="Count returned and timed-out participants")
    completed_only = forms.BooleanField(required=False, label="Count only participants who completed")

    def __init__(self, *args: Any, study: Study, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.study = study

    def clean_evaluation(self) -> SyntheticEval | None:
        given = self.cleaned_data["evaluation"].strip()
        if not given:
            return None
        path = resolve_in_data_root(given, what="evaluation")
        try:
            return read_synthetic_eval(path, search=[data_root()])
        except AnalysisInputError as exc:
            raise ValidationError(str(exc).replace(str(data_root()) + "/", "")) from None

    def clean_dataset(self) -> Path | None:
        given = self.cleaned_data["dataset"].strip()
        if not given:
            return None
        path = resolve_in_data_root(given, what="dataset")
        if not (path / "dataset.json").is_file():
            raise ValidationError(f"{given} is not a complete synthetic dataset (it has no dataset.json).")
        return path

    def options(self) -> AnalysisOptions:
        data = getattr(self, "cleaned_data", {})  # the valid fields of a form with errors too
        return AnalysisOptions(
            rules=ExclusionRules(
                drop_returned=not data.get("keep_returned", False),
                drop_failed_attention=not data.get("keep_failed_attention", False),
                too_fast_ms=data.get("too_fast_ms"),
                completed_only=data.get("completed_only", False),
            )
        )

    def synthetic(self) -> SyntheticInputs:
        """The synthetic side from the valid fields (the domain's persona weights without a dataset);
        a dataset that cannot be read becomes a field error."""
        data = getattr(self, "cleaned_data", {})
        try:
            return synthetic_inputs(
                domain=self.study.domain, evaluation=data.get("evaluation"), dataset=data.get("dataset")
            )
        except (AnalysisInputError, DatasetError) as exc:
            self.add_error("dataset", str(exc).replace(str(data_root()) + "/", ""))
            return synthetic_inputs(domain=self.study.domain, evaluation=data.get("evaluation"))


def _bound_form(request: HttpRequest, study: Study) -> AnalysisForm:
    form = AnalysisForm(request.GET if request.GET else None, study=study)
    if form.is_bound:
        form.is_valid()  # errors are shown beside their fields; the valid fields are used
    return form


def _analysis(study: Study, form: AnalysisForm) -> StudyAnalysis:
    return study_analysis(study=study, options=form.options(), synthetic=form.synthetic())


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@studio_viewer_required
@require_GET
def analysis_page(request: HttpRequest, slug: str) -> HttpResponse:
    """Every analysis of the study, on its data as it is now, with its plots inline."""
    study = get_object_or_404(Study, slug=slug)
    form = _bound_form(request, study)
    context: dict[str, Any] = {
        "study": study,
        "form": form,
        "schema_version": EXPORT_SCHEMA_VERSION,
        "evaluations": evaluations_available(),
        "datasets": datasets_available(domain=study.domain),
        "query": request.GET.urlencode(),
        "crowd": study_crowd_report(study=study) if study.is_imported else None,
        "can_launch": is_coordinator(request.user),
    }
    try:
        analysis = _analysis(study, form)
    except (NothingToExport, AnalysisInputError) as exc:  # no data, or data the analyses cannot read: said
        context["nothing"] = str(exc)
        return render(request, "studio/analysis.html", context)
    context.update(
        analysis=analysis,
        plots={name.removesuffix(".png"): _data_uri(png) for name, png in analysis.figures().items()},
        own_rules={name: analysis.own_rules(result) for name, result in analysis.sections},
    )
    return render(request, "studio/analysis.html", context)


@studio_viewer_required
@require_GET
def analysis_download(request: HttpRequest, slug: str) -> HttpResponse:
    """The page's analyses as a zip: report.md, analysis.json and the PNG plots, in a folder named after
    the study. 409 with the reason for a study without participant data; 400 for a bad field."""
    study = get_object_or_404(Study, slug=slug)
    form = _bound_form(request, study)
    try:
        analysis = _analysis(study, form)
    except (NothingToExport, AnalysisInputError) as exc:
        return HttpResponse(str(exc), status=409, content_type="text/plain; charset=utf-8")
    if form.errors:
        errors = "; ".join(f"{field}: {' '.join(e)}" for field, e in form.errors.items())
        return HttpResponse(errors, status=400, content_type="text/plain; charset=utf-8")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in report_files(analysis).items():
            archive.writestr(f"{study.slug}-analysis/{name}", content)
    response = HttpResponse(buffer.getvalue(), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{study.slug}-analysis.zip"'
    return response


@coordinator_required
@require_POST
def crowd_report_compute(request: HttpRequest, slug: str) -> HttpResponse:
    """The imported study's crowd report as a background job (services.imports.crowd_report_launch); its
    job page follows it, and the analysis page shows the report once it has succeeded."""
    study = get_object_or_404(Study, slug=slug)
    try:
        job = crowd_report_launch(study=study, created_by=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("studio-study-analysis", slug=study.slug)
    return redirect("studio-job", job_id=job.pk)
