"""A database that is down (restarting, failed over, or out of pooled connections) answers every page
with a short "briefly unavailable" page and HTTP 503, not a 500: the failure is temporary and nothing was
half-stored (each write runs in one transaction), so retrying in a minute is the right thing to do.

It sees what a view raises (reading the session or the user happens there too). What another
middleware raises after the view, e.g. the session saved as the response leaves (a database lost in the
moment between the view's last query and that save), reaches the site's server-error handler instead,
`server_error` (urls.handler500), which answers the same page for it."""

import logging
import sys
from collections.abc import Callable

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.views.defaults import server_error as django_server_error
from psycopg_pool import PoolTimeout

logger = logging.getLogger(__name__)

# What a database that cannot be reached raises: Django's wrappers of the driver's errors, and the pool's
# timeout (a psycopg OperationalError, wrapped by Django when raised while connecting).
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)
RETRY_AFTER_S = 60


class DatabaseUnavailableMiddleware:
    """Turns a view's DATABASE_UNAVAILABLE error into the 503 page, rendered without the database (no
    request context, so neither the session nor the user is read)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, DATABASE_UNAVAILABLE):
            return None
        return database_unavailable(request, exception)


def database_unavailable(request: HttpRequest, exception: BaseException) -> HttpResponse:
    """The 503 "briefly unavailable" page, with Retry-After."""
    logger.warning("%s %s: the database is unavailable: %s", request.method, request.path, exception)
    response = HttpResponse(render_to_string("participant/unavailable.html"), status=503)
    response["Retry-After"] = str(RETRY_AFTER_S)
    return response


def server_error(request: HttpRequest) -> HttpResponse:
    """The site's 500 handler (urls.handler500; Django calls it while handling the error): a
    DATABASE_UNAVAILABLE error raised outside a view gets the 503 page too, anything else Django's 500."""
    exception = sys.exc_info()[1]
    if isinstance(exception, DATABASE_UNAVAILABLE):
        return database_unavailable(request, exception)
    return django_server_error(request)
