"""The participant's pages. Each one only translates HTTP: which participant this session is, whether
they asked for the step they are on (studyapp.flow; if not, a redirect there), and a call to a service.

A POST for a step already passed (a replay, a double-click, the back button) is redirected like a GET
and records nothing; a POST that tampers with its fields gets a 400 and changes nothing.
"""

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django.core import signing
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods

from annotation.selectors import elicitation_item_at, rating_item_at
from studyapp.flow import Step, participant_next_step, participant_progress, step_url
from studyapp.forms import PickForm, RatingForm, SurveyForm
from studyapp.models import Participant, Study, new_participant_token
from studyapp.realtime import live_socket_path
from studyapp.selectors import (
    participant_by_recruitment_id,
    participant_by_token,
    participant_outcome,
    participant_status,
)
from studyapp.services import (
    StudyClosed,
    elicitation_pick_record,
    item_mark_shown,
    participant_consent,
    participant_join,
    participant_start_elicitation,
    participant_withdraw,
    rating_record,
    survey_record,
)
from studyapp.sessions import session_bind, session_token

# A newcomer's consent form is good for this long (then "open the study link again").
ENROLMENT_SALT = "studyapp.participant-enrolment"
ENROLMENT_MAX_AGE_S = 24 * 3600
# Recruitment platforms append these to the entry link (Prolific's names).
RECRUITMENT_PARAMS = ("PROLIFIC_PID", "STUDY_ID", "SESSION_ID")
RECRUITMENT_PARAM_MAX_LENGTH = 64

ParticipantView = Callable[[HttpRequest, Participant, Step], HttpResponse]


def _session_participant(request: HttpRequest, slug: str) -> Participant | None:
    return participant_by_token(study_slug=slug, token=session_token(request.session, study_slug=slug))


def _to_current_step(participant: Participant) -> HttpResponse:
    participant.refresh_from_db()
    return redirect(step_url(participant.study.slug, participant_next_step(participant)))


def participant_page(step_name: str) -> Callable[[ParticipantView], Callable[..., HttpResponse]]:
    """A view of one step: it runs only for this session's participant, on the step they are on; any
    other request is redirected to the participant's current step (or, without one, to the entry)."""

    def decorate(view: ParticipantView) -> Callable[..., HttpResponse]:
        @never_cache  # the back button must ask again (and be redirected), not show a stale form
        @require_http_methods(["GET", "POST"])
        @wraps(view)
        def wrapper(request: HttpRequest, slug: str, number: int | None = None) -> HttpResponse:
            participant = _session_participant(request, slug)
            if participant is None:
                return redirect("participant-entry", slug=slug)
            step = participant_next_step(participant)
            if step != Step(step_name, None if number is None else number - 1):
                return redirect(step_url(slug, step))
            return view(request, participant, step)

        return wrapper

    return decorate


def _page(
    request: HttpRequest,
    participant: Participant,
    step: Step,
    template: str,
    context: dict[str, Any] | None = None,
    status: int = 200,
) -> HttpResponse:
    base = {
        "participant": participant,
        "study": participant.study,
        "progress": participant_progress(participant, step),
        "withdraw_url": reverse("participant-withdraw", kwargs={"slug": participant.study.slug}),
    }
    return render(request, f"participant/{template}", {**base, **(context or {})}, status=status)


def _posted(request: HttpRequest) -> Any:
    """The POST data to bind a form to (an empty POST still binds: every survey answer is optional)."""
    return request.POST if request.method == "POST" else None


def _bad_request(request: HttpRequest, message: str) -> HttpResponse:
    return render(request, "participant/error.html", {"message": message}, status=400)


def _recruitment_params(request: HttpRequest) -> dict[str, str] | HttpResponse:
    """The link's recruitment parameters (empty when absent), or a 400 page when one is too long."""
    params = {name: request.GET.get(name, "").strip() for name in RECRUITMENT_PARAMS}
    for name, value in params.items():
        if len(value) > RECRUITMENT_PARAM_MAX_LENGTH:
            return _bad_request(
                request, f"The link's {name} is too long. Please use the link you were given."
            )
    return params


def _known_participant(request: HttpRequest, study: Study, params: dict[str, str]) -> Participant | None:
    """The link's participant (by PROLIFIC_PID), now bound to this browser; without an id, this browser's."""
    if not params["PROLIFIC_PID"]:
        return _session_participant(request, study.slug)
    participant = participant_by_recruitment_id(study=study, recruitment_id=params["PROLIFIC_PID"])
    if participant is not None:
        session_bind(request.session, study_slug=study.slug, token=participant.token)
    return participant


@never_cache
@require_GET
def entry(request: HttpRequest, slug: str) -> HttpResponse:
    """/s/<slug>/?PROLIFIC_PID=…&STUDY_ID=…&SESSION_ID=…: the same recruitment id always comes back to
    the same participant; without one, this browser's participant. A newcomer goes to the consent page
    with the link's parameters, and nothing is stored yet: a link fetched by a bot or a prefetcher
    creates no participant and takes no place."""
    study = get_object_or_404(Study, slug=slug)
    params = _recruitment_params(request)
    if isinstance(params, HttpResponse):
        return params
    participant = _known_participant(request, study, params)
    if participant is not None:
        return redirect(step_url(slug, participant_next_step(participant)))
    if not study.is_open:
        return render(request, "participant/closed.html", {"study": study})
    query = urlencode({k: v for k, v in params.items() if v})
    return redirect(reverse("participant-consent", kwargs={"slug": slug}) + (f"?{query}" if query else ""))


@never_cache
@require_http_methods(["GET", "POST"])
def consent(request: HttpRequest, slug: str) -> HttpResponse:
    """The consent page, of a newcomer (no participant yet: agreeing or declining makes one, and
    agreeing takes a quota place) or of a participant who has not decided. The newcomer's form carries
    a signed token, so a double-click makes one participant and a forged form none."""
    study = get_object_or_404(Study, slug=slug)
    params = _recruitment_params(request)
    if isinstance(params, HttpResponse):
        return params
    participant = _known_participant(request, study, params)
    if participant is not None and participant_next_step(participant) != Step("consent"):
        return redirect(step_url(slug, participant_next_step(participant)))
    if participant is None and not study.is_open:
        return render(request, "participant/closed.html", {"study": study})
    if request.method == "POST":
        return _consent_decided(request, study, participant, params)
    return _consent_page(request, study, participant)


def _consent_page(
    request: HttpRequest, study: Study, participant: Participant | None, error: str = ""
) -> HttpResponse:
    context = {
        "study": study,
        "participant": participant,
        "progress": participant_progress(participant, Step("consent")),
        "enrolment": "" if participant else signing.dumps(new_participant_token(), salt=ENROLMENT_SALT),
        "error": error,
    }
    return render(request, "participant/consent.html", context, status=400 if error else 200)


def _consent_decided(
    request: HttpRequest, study: Study, participant: Participant | None, params: dict[str, str]
) -> HttpResponse:
    decision = request.POST.get("decision")
    if decision not in ("agree", "decline"):
        return _consent_page(request, study, participant, "Choose to take part or not.")
    if participant is not None:
        participant_consent(participant=participant, agreed=decision == "agree")
        return _to_current_step(participant)
    try:
        token = signing.loads(
            request.POST.get("enrolment", ""), salt=ENROLMENT_SALT, max_age=ENROLMENT_MAX_AGE_S
        )
    except signing.BadSignature:
        return _bad_request(request, "This page has expired. Please open the study link again.")
    try:
        participant = participant_join(
            study=study,
            agreed=decision == "agree",
            token=token,
            recruitment_id=params["PROLIFIC_PID"] or None,
            recruitment_study_id=params["STUDY_ID"],
            recruitment_session_id=params["SESSION_ID"],
        )
    except StudyClosed:
        return render(request, "participant/closed.html", {"study": study})
    session_bind(request.session, study_slug=study.slug, token=participant.token)
    return redirect(step_url(study.slug, participant_next_step(participant)))


@participant_page("instructions")
def instructions(request: HttpRequest, participant: Participant, step: Step) -> HttpResponse:
    if request.method == "POST":
        try:
            participant_start_elicitation(participant=participant)
        except ValidationError as exc:
            return _bad_request(request, " ".join(exc.messages))
        return _to_current_step(participant)
    return _page(request, participant, step, "instructions.html")


@participant_page("elicitation")
def pick(request: HttpRequest, participant: Participant, step: Step) -> HttpResponse:
    item = elicitation_item_at(participant=participant, position=step.item)
    form = PickForm(_posted(request), initial={"item": item.pk})
    if request.method == "POST":
        if form.is_valid():
            try:
                elicitation_pick_record(
                    participant=participant,
                    item_id=form.cleaned_data["item"],
                    choice=form.cleaned_data["choice"],
                )
                return _to_current_step(participant)
            except ValidationError as exc:
                form.add_error(None, exc)
        return _page(request, participant, step, "pick.html", {"item": item, "form": form}, status=400)
    item_mark_shown(item=item)
    return _page(request, participant, step, "pick.html", {"item": item, "form": form})


@participant_page("waiting")
def waiting(request: HttpRequest, participant: Participant, step: Step) -> HttpResponse:
    context = {
        "status": participant_status(participant=participant),
        "socket_path": live_socket_path(f"/ws/participants/{participant.token}/"),
        "status_url": reverse("participant-status", kwargs={"slug": participant.study.slug}),
    }
    return _page(request, participant, step, "waiting.html", context)


@never_cache
@require_GET
def status(request: HttpRequest, slug: str) -> JsonResponse:
    """The waiting page's polling fallback: the same payload its socket sends."""
    participant = _session_participant(request, slug)
    if participant is None:
        return JsonResponse({"error": "This browser is not taking part in this study."}, status=403)
    return JsonResponse(participant_status(participant=participant))


@participant_page("rating")
def rate(request: HttpRequest, participant: Participant, step: Step) -> HttpResponse:
    item = rating_item_at(participant=participant, position=step.item)
    form = RatingForm(_posted(request), initial={"item": item.pk})
    if request.method == "POST":
        if form.is_valid():
            data = form.cleaned_data
            try:
                rating_record(
                    participant=participant,
                    item_id=data["item"],
                    choice=data["choice"],
                    strength=data["strength"],
                    reason=data["reason"],
                )
                return _to_current_step(participant)
            except ValidationError as exc:
                form.add_error(None, exc)
        return _page(request, participant, step, "rate.html", {"item": item, "form": form}, status=400)
    item_mark_shown(item=item)
    return _page(request, participant, step, "rate.html", {"item": item, "form": form})


@participant_page("survey")
def survey(request: HttpRequest, participant: Participant, step: Step) -> HttpResponse:
    form = SurveyForm(_posted(request))
    if request.method == "POST":
        if form.is_valid():
            try:
                survey_record(participant=participant, answers=form.cleaned_data)
                return _to_current_step(participant)
            except ValidationError as exc:
                form.add_error(None, exc)
        return _page(request, participant, step, "survey.html", {"form": form}, status=400)
    return _page(request, participant, step, "survey.html", {"form": form})


@participant_page("done")
def done(request: HttpRequest, participant: Participant, step: Step) -> HttpResponse:
    return _page(
        request, participant, step, "done.html", {"outcome": participant_outcome(participant=participant)}
    )


@never_cache
@require_http_methods(["GET", "POST"])
def withdraw(request: HttpRequest, slug: str) -> HttpResponse:
    """Withdraw from the study (after a confirmation page): the participant's data is deleted."""
    participant = _session_participant(request, slug)
    if participant is None:
        return redirect("participant-entry", slug=slug)
    if not participant.may_withdraw:
        return _to_current_step(participant)
    if request.method == "POST":
        participant_withdraw(participant=participant)
        return _to_current_step(participant)
    step = participant_next_step(participant)
    context = {"back_url": step_url(slug, step)}
    return _page(request, participant, step, "withdraw.html", context)
