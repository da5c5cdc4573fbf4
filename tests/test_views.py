import pytest
from django.db import connection
from django.test import Client


@pytest.mark.django_db
def test_it_reports_health_with_the_database_vendor(client: Client) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"ok": True, "database": connection.vendor}
