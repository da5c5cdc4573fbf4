"""studyapp.middleware: a database that is down answers a short "briefly unavailable" page (503), and
every other error is left to the server error page."""

import pytest
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from psycopg_pool import PoolTimeout

from studyapp.middleware import DatabaseUnavailableMiddleware, server_error


def answer_to(exception: Exception) -> HttpResponse | None:
    def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    request = RequestFactory().post("/s/a-study/pick/2/")
    return DatabaseUnavailableMiddleware(view).process_exception(request, exception)


@pytest.mark.parametrize(
    "exception",
    [OperationalError("the server closed the connection"), InterfaceError("closed"), PoolTimeout("no room")],
    ids=["operational", "interface", "pool timeout"],
)
def test_it_answers_a_database_that_is_down_with_the_briefly_unavailable_page(exception: Exception) -> None:
    response = answer_to(exception)

    assert response is not None
    assert response.status_code == 503
    assert response["Retry-After"] == "60"
    assert "The study is briefly unavailable, please retry in a minute." in response.content.decode()


def test_it_leaves_any_other_error_to_the_server_error_page() -> None:
    assert answer_to(ValueError("a bug")) is None


def server_error_for(exception: Exception) -> HttpResponse:
    """The site's 500 handler, called as Django calls it: while the error is being handled."""
    request = RequestFactory().get("/s/a-study/pick/2/")
    try:
        raise exception
    except Exception:
        return server_error(request)


def test_a_database_lost_outside_a_view_gets_the_briefly_unavailable_page_too() -> None:
    response = server_error_for(OperationalError("the server closed the connection"))

    assert (response.status_code, response["Retry-After"]) == (503, "60")
    assert "The study is briefly unavailable" in response.content.decode()


def test_any_other_error_outside_a_view_is_a_500() -> None:
    response = server_error_for(ValueError("a bug"))

    assert response.status_code == 500
    assert "briefly unavailable" not in response.content.decode()
