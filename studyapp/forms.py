"""Participant forms: they only parse the POST; the services decide whether it may be recorded."""

from django import forms

from annotation.models import Side, SurveyResponse
from studyapp.services.journey import REASON_MAX_LENGTH

STRENGTHS = [
    (1, "1 · barely better"),
    (2, "2"),
    (3, "3 · clearly better"),
    (4, "4"),
    (5, "5 · much better"),
]


class PickForm(forms.Form):
    item = forms.IntegerField(widget=forms.HiddenInput)
    choice = forms.ChoiceField(choices=Side.choices, error_messages={"required": "Choose Response A or B."})


class RatingForm(forms.Form):
    item = forms.IntegerField(widget=forms.HiddenInput)
    choice = forms.ChoiceField(
        choices=Side.choices,
        widget=forms.RadioSelect,
        label="Which response is better for you?",
        error_messages={"required": "Choose Response A or Response B."},
    )
    strength = forms.TypedChoiceField(
        choices=STRENGTHS,
        coerce=int,
        widget=forms.RadioSelect,
        label="How much better?",
        error_messages={"required": "Choose how much better, from 1 to 5."},
    )
    reason = forms.CharField(
        required=False,
        max_length=REASON_MAX_LENGTH,
        label="Why? (optional, one sentence)",
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )


class SurveyForm(forms.ModelForm):
    class Meta:
        model = SurveyResponse
        fields = ["self_description", "age_range", "gender", "education", "occupation", "comments"]
        labels = {
            "self_description": "In a few sentences, how would you describe yourself and what you look for "
            "in an answer?",
            "age_range": "Age",
            "gender": "Gender",
            "education": "Highest education",
            "occupation": "Occupation",
            "comments": "Anything else you would like to tell us?",
        }
        widgets = {
            "self_description": forms.Textarea(attrs={"rows": 4}),
            "comments": forms.Textarea(attrs={"rows": 3}),
        }

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        for name in ("age_range", "education"):
            field = self.fields[name]
            field.choices = [("", "Prefer not to say"), *list(field.choices)[1:]]
