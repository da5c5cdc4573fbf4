"""The studio's forms: they parse what a coordinator typed or uploaded; the services decide whether it
may be stored (and say why not, keyed by field where they can)."""

from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError

from annotation.pool import PoolSource, pool_from_dataset, pool_from_file
from modeling.synth import BUILTIN_DOMAINS
from studyapp.datastore import resolve_in_data_root
from studyapp.models import Arm, Study
from studyapp.services import ArmSpec
from studyapp.study_fields import STUDY_FIELDS, STUDY_LABELS, STUDY_SECTIONS


def datalist_input(datalist: str) -> forms.TextInput:
    """A text input that suggests the page's `datalist` (the data folder's datasets, checkpoints, ...)
    in place of the browser's own history."""
    return forms.TextInput(attrs={"list": datalist, "autocomplete": "off"})


class StudyForm(forms.ModelForm):
    completion_url = forms.URLField(
        required=False,
        max_length=500,
        assume_scheme="https",
        label=STUDY_LABELS["completion_url"],
        help_text=Study._meta.get_field("completion_url").help_text,
    )

    class Meta:
        model = Study
        fields = STUDY_FIELDS
        labels = STUDY_LABELS
        widgets = {
            "instruction": forms.Textarea(attrs={"rows": 3}),
            "consent_text": forms.Textarea(attrs={"rows": 6}),
            "instructions_text": forms.Textarea(attrs={"rows": 4}),
            "domain": datalist_input("domains"),
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Both may come from an imported synthetic dataset (the service fills them in, or says they are
        # missing).
        self.fields["domain"].required = False
        self.fields["instruction"].required = False
        self.fields["domain"].help_text = (
            "The synthetic domain (reviews, elix, roleplay, or your own). Leave empty to take it from "
            "the imported dataset."
        )
        self.fields["instruction"].help_text = (
            "The task text models see under '# Task', exactly as in training. Leave empty to take the "
            "dataset's domain task."
        )
        # Optional: left empty, the default applies (a form posted without it keeps working).
        limit = self.fields["time_limit_minutes"]
        limit.required = False
        limit.help_text = f"{limit.help_text} Empty: {self.default_time_limit} minutes."

    default_time_limit = Study._meta.get_field("time_limit_minutes").default

    def clean_time_limit_minutes(self) -> int:
        value = self.cleaned_data.get("time_limit_minutes")
        return self.default_time_limit if value is None else value


class FormsetRow(forms.Form):
    """A row of a formset shown as a table row: its inputs have no visible label of their own, so each
    gets one for screen readers ("Arm 2 checkpoint")."""

    row_title = "Row"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        number = int(self.prefix.rsplit("-", 1)[-1]) + 1 if self.prefix and self.prefix[-1].isdigit() else 1
        for name, field in self.fields.items():
            label = "remove" if name == "DELETE" else (field.label or name.replace("_", " ")).lower()
            field.widget.attrs["aria-label"] = f"{self.row_title} {number} {label}"


class ArmForm(FormsetRow):
    row_title = "Arm"
    name = forms.CharField(max_length=64, help_text="Never shown to participants.")
    # A blank first choice: an unused extra row must post nothing, or it would count as filled in.
    method = forms.ChoiceField(choices=[("", "Choose…"), *Arm.Method.choices])
    checkpoint = forms.CharField(
        max_length=500,
        help_text="A model or adapter directory (or hf:/dir), vllm:/dir, or http(s)://host:port/v1#model.",
    )


class ComparisonForm(FormsetRow):
    row_title = "Comparison"
    arm = forms.CharField(max_length=64, widget=forms.TextInput(attrs={"list": "arm-names"}))
    baseline = forms.CharField(max_length=64, widget=forms.TextInput(attrs={"list": "arm-names"}))


ArmFormSet = forms.formset_factory(ArmForm, extra=2, can_delete=True)
ComparisonFormSet = forms.formset_factory(ComparisonForm, extra=2, can_delete=True)


DEFAULT_POOL_QUESTIONS = 50


def _pool_size_field(label: str, help_text: str) -> forms.IntegerField:
    """How many questions of one kind to take from a dataset (empty: DEFAULT_POOL_QUESTIONS)."""
    return forms.IntegerField(
        required=False,
        min_value=1,
        max_value=5000,
        initial=DEFAULT_POOL_QUESTIONS,
        label=label,
        help_text=help_text,
    )


class PoolForm(forms.Form):
    """Where the question pool comes from: a synthetic dataset in the data folder, or a file."""

    dataset = forms.CharField(
        required=False,
        label="From a synthetic dataset",
        help_text="A dataset folder inside the data folder, e.g. datasets/elix.",
        widget=datalist_input("datasets"),
    )
    elicitation_questions = _pool_size_field(
        "Elicitation questions", "How many to take; each with the pair its synthetic users disagreed on most."
    )
    evaluation_questions = _pool_size_field(
        "Evaluation questions", "How many to take, from the dataset's held-out topics."
    )
    file = forms.FileField(
        required=False,
        label="Or from a file",
        help_text="CSV with a header row, or JSON Lines, with the fields question, response_a, response_b "
        "and kind (elicitation or evaluation); optional topic and id.",
        widget=forms.ClearableFileInput(attrs={"accept": ".csv,.jsonl,.ndjson"}),
    )
    replace = forms.BooleanField(
        required=False,
        initial=True,
        label="Replace the current pool (otherwise add to it)",
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        upload, dataset = data.get("file"), (data.get("dataset") or "").strip()
        if upload and dataset:
            raise ValidationError("Choose a dataset or a file, not both.")
        pool: PoolSource | None = None
        if upload:
            if upload.size > settings.POOL_UPLOAD_MAX_BYTES:
                limit = settings.POOL_UPLOAD_MAX_BYTES // (1024 * 1024)
                self.add_error("file", f"The file is larger than {limit} MB.")
                return data
            try:
                pool = pool_from_file(upload.name, upload.read())
            except ValidationError as exc:
                self.add_error("file", exc)
        elif (
            dataset
            and not self.has_error("elicitation_questions")
            and not self.has_error("evaluation_questions")
        ):
            try:
                pool = pool_from_dataset(
                    resolve_in_data_root(dataset, what="dataset"),
                    elicitation=data.get("elicitation_questions") or DEFAULT_POOL_QUESTIONS,
                    evaluation=data.get("evaluation_questions") or DEFAULT_POOL_QUESTIONS,
                )
            except ValidationError as exc:
                self.add_error("dataset", exc)
        data["pool"] = pool
        return data


class StudyEditor:
    """The study page's parts, bound and checked together: the settings, the arms, the comparisons and
    where the pool comes from. Errors the services raise are shown next to the field they name, and the
    others at the top of the page."""

    def __init__(self, data: Any = None, files: Any = None, *, study: Study | None = None) -> None:
        self.study = study
        arms = list(study.arms.order_by("id")) if study else []
        comparisons = (
            list(study.comparisons.select_related("arm", "baseline").order_by("id")) if study else []
        )
        self.settings = StudyForm(data, instance=study)
        self.arms = ArmFormSet(
            data,
            prefix="arms",
            initial=[{"name": a.name, "method": a.method, "checkpoint": a.checkpoint} for a in arms],
        )
        self.comparisons = ComparisonFormSet(
            data,
            prefix="comparisons",
            initial=[{"arm": c.arm.name, "baseline": c.baseline.name} for c in comparisons],
        )
        self.pool = PoolForm(data, files, prefix="pool", initial={"replace": True})
        self.errors: list[str] = []

    def sections(self) -> list[tuple[str, str, list[forms.BoundField]]]:
        """The settings' sections as the page shows them: (title, what it is for, its bound fields)."""
        return [
            (section.title, section.about, [self.settings[s.name] for s in section.settings])
            for section in STUDY_SECTIONS
        ]

    def is_valid(self) -> bool:
        parts = (self.settings, self.arms, self.comparisons, self.pool)
        return all([part.is_valid() for part in parts])  # a list: every part shows its errors

    def fields(self) -> dict[str, Any]:
        return {name: self.settings.cleaned_data[name] for name in STUDY_FIELDS}

    def arm_specs(self) -> list[ArmSpec]:
        return [ArmSpec(d["name"].strip(), d["method"], d["checkpoint"].strip()) for d in _kept(self.arms)]

    def comparison_pairs(self) -> list[tuple[str, str]]:
        return [(d["arm"].strip(), d["baseline"].strip()) for d in _kept(self.comparisons)]

    def pool_source(self) -> PoolSource | None:
        return self.pool.cleaned_data.get("pool")

    def replace_pool(self) -> bool:
        return bool(self.pool.cleaned_data.get("replace"))

    def add_error(self, exc: ValidationError) -> None:
        """Show a service's ValidationError: on the field it names, or at the top of the page."""
        if not hasattr(exc, "error_dict"):
            self.errors.extend(exc.messages)
            return
        for field, errors in exc.message_dict.items():
            if field in self.settings.fields:
                self.settings.add_error(field, errors)
            else:
                self.errors.extend(errors)

    def all_errors(self) -> list[tuple[str, str]]:
        """Every error on the page as (anchor, message), for the summary at its top."""
        found = [("", message) for message in self.errors]
        for form, anchor in ((self.settings, "settings"), (self.pool, "pool")):
            found += [(anchor, m) for m in form.non_field_errors()]
            found += [
                (form[name].auto_id, f"{form[name].label}: {m}")
                for name, ms in form.errors.items()
                if name != "__all__"
                for m in ms
            ]
        for formset, title in ((self.arms, "Arm"), (self.comparisons, "Comparison")):
            found += [(formset.prefix, m) for m in formset.non_form_errors()]
            for number, form in enumerate(formset.forms, start=1):
                found += [
                    (form[name].auto_id, f"{title} {number}, {form[name].label.lower()}: {m}")
                    for name, ms in form.errors.items()
                    if name != "__all__"
                    for m in ms
                ]
        return found


def _kept(formset: forms.BaseFormSet) -> list[dict[str, Any]]:
    """The rows a coordinator filled in and did not mark for removal."""
    return [
        form.cleaned_data
        for form in formset.forms
        if form.cleaned_data and not form.cleaned_data.get("DELETE")
    ]


# ---------------------------------------------------------------------------------------------------
# Jobs


class JobForm(forms.Form):
    name = forms.SlugField(
        max_length=64,
        help_text="Names the output folder in the data folder; letters, numbers, hyphens and underscores.",
    )
    study = forms.ModelChoiceField(
        queryset=Study.objects.order_by("title"),
        required=False,
        empty_label="No study",
        help_text="Optional: list the job on this study's page.",
    )

    def params(self) -> dict[str, Any]:
        """The job's parameters for services.job_launch."""
        return {k: v for k, v in self.cleaned_data.items() if k != "study"}


class SynthJobForm(JobForm):
    domain = forms.ChoiceField(choices=[(d, d) for d in BUILTIN_DOMAINS])
    users = forms.IntegerField(min_value=1, max_value=1_000_000, initial=1000)
    pairs_per_user = forms.IntegerField(min_value=1, max_value=500, initial=20, label="Pairs per user")
    seed = forms.IntegerField(min_value=0, initial=0)


class TrainJobForm(JobForm):
    dataset = forms.CharField(
        help_text="A synthetic dataset folder in the data folder, e.g. datasets/elix.",
        widget=datalist_input("datasets"),
    )
    init = forms.CharField(
        required=False,
        label="Start from",
        help_text="A checkpoint in the data folder (e.g. checkpoints/base); empty to build a tiny model "
        "from scratch (pretrain only).",
        widget=datalist_input("checkpoints"),
    )
    stage = forms.ChoiceField(
        choices=[
            ("pretrain", "pretrain: the base model, from scratch"),
            ("sft", "sft: Pref-FT on the preferred responses"),
            ("ipo", "ipo: FSPO's preference stage (from a Pref-FT checkpoint)"),
            ("dpo", "dpo"),
        ],
        initial="sft",
    )
    context = forms.ChoiceField(
        choices=[
            ("fewshot", "few-shot pairs (FSPO)"),
            ("none", "nothing about the user (aggregate baseline)"),
            ("description", "the true persona description (oracle)"),
        ],
        initial="fewshot",
        label="The prompt holds",
    )
    cot = forms.BooleanField(required=False, label="User-description chain-of-thought")
    shots_min = forms.IntegerField(min_value=0, max_value=64, initial=1, label="Fewest shots")
    shots_max = forms.IntegerField(min_value=0, max_value=64, initial=8, label="Most shots")
    steps = forms.IntegerField(min_value=1, max_value=10_000_000, initial=200)
    batch_size = forms.IntegerField(min_value=1, max_value=1024, initial=4)
    lr = forms.FloatField(min_value=0, initial=1e-3, label="Learning rate")
    seed = forms.IntegerField(min_value=0, initial=0)

    def params(self) -> dict[str, Any]:
        params = super().params()
        params["shots"] = (params.pop("shots_min"), params.pop("shots_max"))
        return params


class EvaluateJobForm(JobForm):
    dataset = forms.CharField(
        help_text="The synthetic dataset whose held-out users and topics are evaluated on.",
        widget=datalist_input("datasets"),
    )
    arms = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "spellcheck": "false"}),
        help_text="One arm a line: name=checkpoint[:context][:cot], e.g. fspo=checkpoints/fspo or "
        "base=checkpoints/base:none.",
    )
    baseline = forms.CharField(max_length=64, help_text="The arm every other arm is compared with.")
    episodes = forms.IntegerField(min_value=1, max_value=100_000, initial=100)
    shots = forms.IntegerField(min_value=0, max_value=64, initial=4)


JOB_FORMS: dict[str, type[JobForm]] = {
    "synth": SynthJobForm,
    "train": TrainJobForm,
    "evaluate": EvaluateJobForm,
}
