"""Who may use the studio (the coordinators' pages and sockets): active staff users, or members of the
`coordinators` group. Participants have no user account, so their sessions never pass."""

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

COORDINATORS_GROUP = "coordinators"


def is_coordinator(user: Any) -> bool:
    """Whether this user may see and change studies and jobs. Reads the user's groups (a query)."""
    if user is None or not user.is_authenticated or not user.is_active:
        return False
    return bool(user.is_staff or user.groups.filter(name=COORDINATORS_GROUP).exists())


def coordinator_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A studio view: anonymous visitors (participants included) go to the login page, and a signed-in
    user who is not a coordinator gets a 403."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not is_coordinator(request.user):
            return render(request, "studio/forbidden.html", status=403)
        return view(request, *args, **kwargs)

    return wrapper
