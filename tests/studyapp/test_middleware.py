"""studyapp.middleware: a database that is down answers a short "briefly unavailable" page (503), and
every other error is left to the server error page."""

import pytest
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from psycopg_pool import PoolTimeout

from studyapp.middleware import DatabaseUnavailableMiddleware


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
