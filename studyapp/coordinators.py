"""Who may use the studio (the coordinators' pages and sockets), and the export API's tokens.

Two roles, both of signed-in, active user accounts:
- coordinators (staff users, or members of the `coordinators` group) see and change everything: studies,
  participants, jobs;
- analysts (members of the `analysts` group) see dashboards, job results and exports, and download
  exports, but change nothing: creating or editing a study and launching a job answer 403.

Participants have no user account, so their sessions never pass either check. Scripts reach the export
API with a bearer token (api_token_for) instead of a session.
"""

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.views import redirect_to_login
from django.core import signing
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.crypto import constant_time_compare, salted_hmac

COORDINATORS_GROUP = "coordinators"
ANALYSTS_GROUP = "analysts"  # created by annotation's migration 0003_analysts_group

API_TOKEN_SALT = "studyapp.coordinators.api-token"
API_TOKEN_MAX_AGE_S = 30 * 24 * 3600


def _signed_in(user: Any) -> bool:
    return user is not None and user.is_authenticated and user.is_active


def is_coordinator(user: Any) -> bool:
    """Whether this user may see and change studies and jobs. Reads the user's groups (a query)."""
    if not _signed_in(user):
        return False
    return bool(user.is_staff or user.groups.filter(name=COORDINATORS_GROUP).exists())


def can_view_studio(user: Any) -> bool:
    """Whether this user may see the studio's pages and exports: a coordinator or an analyst."""
    if not _signed_in(user):
        return False
    return bool(user.is_staff or user.groups.filter(name__in=(COORDINATORS_GROUP, ANALYSTS_GROUP)).exists())


def _forbidden(request: HttpRequest) -> HttpResponse:
    return render(request, "studio/forbidden.html", {"viewer": can_view_studio(request.user)}, status=403)


def _studio_view(
    view: Callable[..., HttpResponse], allowed: Callable[[Any], bool]
) -> Callable[..., HttpResponse]:
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not allowed(request.user):
            return _forbidden(request)
        return view(request, *args, **kwargs)

    return wrapper


def coordinator_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A studio view that changes things (studies, participants, jobs): anonymous visitors (participants
    included) go to the login page, and a signed-in user who is not a coordinator (an analyst too) gets
    a 403."""
    return _studio_view(view, is_coordinator)


def studio_viewer_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A studio view that only shows (dashboards, job results, exports): for coordinators and analysts;
    anonymous visitors go to the login page, other signed-in users get a 403."""
    return _studio_view(view, can_view_studio)


# ---------------------------------------------------------------------------------------------------
# The export API's bearer tokens


def _password_tag(user: Any) -> str:
    # Ties a token to the user's current password hash: changing the password revokes every token.
    return salted_hmac(API_TOKEN_SALT, user.password).hexdigest()[:20]


def api_token_for(user: Any) -> str:
    """A token that lets a script call the export API as this user for API_TOKEN_MAX_AGE_S (sent as
    `Authorization: Bearer <token>`). It is signed with SECRET_KEY, so the server stores nothing; it stops
    working when it expires, when the user's password changes, or when the user loses their role."""
    return signing.dumps({"u": user.pk, "p": _password_tag(user)}, salt=API_TOKEN_SALT, compress=False)


def user_for_api_token(token: str) -> Any | None:
    """The active user a valid, unexpired token was made for, or None."""
    try:
        data = signing.loads(token, salt=API_TOKEN_SALT, max_age=API_TOKEN_MAX_AGE_S)
    except signing.BadSignature:  # expired tokens too (SignatureExpired is a BadSignature)
        return None
    if not isinstance(data, dict):
        return None
    user = get_user_model().objects.filter(pk=data.get("u"), is_active=True).first()
    if user is None or not constant_time_compare(str(data.get("p", "")), _password_tag(user)):
        return None
    return user


def api_viewer_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """An API view for coordinators and analysts, signed in (a session) or sending a bearer token. It
    answers JSON: 401 without valid credentials (participants' sessions included), 403 for a user
    without a studio role."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            user = user_for_api_token(token.strip())
            if user is None:
                return _unauthorized("The token is not valid (expired, revoked or mistyped).")
            request.user = user
        elif not request.user.is_authenticated:
            return _unauthorized("Sign in, or send 'Authorization: Bearer <token>' (from the export page).")
        if not can_view_studio(request.user):
            return JsonResponse(
                {"error": "This account is neither a coordinator nor an analyst."}, status=403
            )
        return view(request, *args, **kwargs)

    return wrapper


def _unauthorized(message: str) -> JsonResponse:
    response = JsonResponse({"error": message}, status=401)
    response["WWW-Authenticate"] = 'Bearer realm="fspo-export"'
    return response
