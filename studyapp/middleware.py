"""A database that is down (restarting, failed over, or out of pooled connections) answers every page
with a short "briefly unavailable" page and HTTP 503, not a 500: the failure is temporary and nothing was
half-stored (each write runs in one transaction), so retrying in a minute is the right thing to do.

It sees what a view raises (reading the session or the user happens there too). What another
middleware raises after the view, e.g. the session saved as the response leaves, is Django's 500: only a
database lost in the moment between the view's last query and that save reaches it."""

import logging
from collections.abc import Callable

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
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
        logger.warning("%s %s: the database is unavailable: %s", request.method, request.path, exception)
        response = HttpResponse(render_to_string("participant/unavailable.html"), status=503)
        response["Retry-After"] = str(RETRY_AFTER_S)
        return response
