import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

REPO = Path(__file__).resolve().parent.parent
KNOBS = (
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "DEBUG",
    "SECRET_KEY",
    "PARTICIPANT_ID_KEY",
)

# Loads the settings the way a process does (through the Celery app, which reads them from Django)
# and prints what the environment turned into.
PRINT_SETTINGS = """
import json
from django.conf import settings
from studyapp.celery import app
print(json.dumps({
    "db_engine": settings.DATABASES["default"]["ENGINE"],
    "db_name": str(settings.DATABASES["default"]["NAME"]),
    "db_options": settings.DATABASES["default"].get("OPTIONS", {}),
    "broker_url": app.conf.broker_url,
    "result_backend": app.conf.result_backend,
    "channel_layer": settings.CHANNEL_LAYERS["default"]["BACKEND"],
    "debug": settings.DEBUG,
}))
"""


def run_settings(*, debug: str | None = "true", **env: str) -> subprocess.CompletedProcess[str]:
    """Load studyapp.settings in a fresh interpreter with exactly these deploy knobs set (DEBUG on
    unless `debug` says otherwise; None leaves it unset, the deployment default)."""
    base = {k: v for k, v in os.environ.items() if k not in KNOBS}
    base["DJANGO_SETTINGS_MODULE"] = "studyapp.settings"
    if debug is not None:
        base["DEBUG"] = debug
    return subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS], cwd=REPO, env={**base, **env}, capture_output=True, text=True
    )


def settings_under(**env: str) -> dict[str, str]:
    proc = run_settings(**env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_it_uses_postgresql_when_database_url_is_set() -> None:
    seen = settings_under(DATABASE_URL="postgres://postgres@127.0.0.1:5432/test")

    assert seen["db_engine"] == "django.db.backends.postgresql"
    assert seen["db_name"] == "test"


def test_it_uses_sqlite_under_var_by_default() -> None:
    seen = settings_under()

    assert seen["db_engine"] == "django.db.backends.sqlite3"
    assert seen["db_name"] == str(REPO / "var" / "db.sqlite3")


def test_it_lets_the_server_and_the_worker_share_a_sqlite_file(tmp_path: Path) -> None:
    seen = settings_under(DATABASE_URL=f"sqlite:///{tmp_path / 'site.sqlite3'}")

    assert seen["db_name"] == str(tmp_path / "site.sqlite3")
    assert seen["db_options"]["init_command"] == "PRAGMA journal_mode=WAL"
    assert seen["db_options"]["transaction_mode"] == "IMMEDIATE"


def test_it_puts_celery_and_channels_on_redis_when_redis_url_is_set() -> None:
    seen = settings_under(REDIS_URL="redis://127.0.0.1:6379/3")

    assert seen["broker_url"] == "redis://127.0.0.1:6379/3"
    assert seen["result_backend"] == "redis://127.0.0.1:6379/3"
    assert seen["channel_layer"] == "channels_redis.core.RedisChannelLayer"


def test_it_needs_no_server_for_celery_and_channels_by_default() -> None:
    seen = settings_under()

    assert seen["broker_url"] == f"sqla+sqlite:///{REPO / 'var' / 'celery-broker.sqlite'}"
    assert seen["result_backend"] == f"db+sqlite:///{REPO / 'var' / 'celery-results.sqlite'}"
    assert seen["channel_layer"] == "channels.layers.InMemoryChannelLayer"


def test_it_lets_celery_urls_override_redis_url() -> None:
    seen = settings_under(
        REDIS_URL="redis://127.0.0.1:6379/3",
        CELERY_BROKER_URL="amqp://guest@127.0.0.1:5672//",
        CELERY_RESULT_BACKEND="db+postgresql://postgres@127.0.0.1/results",
    )

    assert seen["broker_url"] == "amqp://guest@127.0.0.1:5672//"
    assert seen["result_backend"] == "db+postgresql://postgres@127.0.0.1/results"
    assert seen["channel_layer"] == "channels_redis.core.RedisChannelLayer"


def test_it_refuses_to_start_without_secret_key_when_debug_is_off() -> None:
    proc = run_settings(debug="false")

    assert proc.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is false" in proc.stderr


def test_debug_is_off_unless_it_is_asked_for() -> None:
    unset = run_settings(debug=None)
    keyed = run_settings(debug=None, SECRET_KEY="a-real-secret", PARTICIPANT_ID_KEY="another-secret")

    assert unset.returncode != 0 and "SECRET_KEY must be set when DEBUG is false" in unset.stderr
    assert keyed.returncode == 0, keyed.stderr
    assert json.loads(keyed.stdout)["debug"] is False


def test_it_refuses_to_start_without_a_participant_id_key_when_debug_is_off() -> None:
    proc = run_settings(debug="false", SECRET_KEY="a-real-secret")

    assert proc.returncode != 0
    assert "PARTICIPANT_ID_KEY must be set when DEBUG is false" in proc.stderr


def test_it_rejects_a_boolean_it_cannot_read() -> None:
    proc = run_settings(debug="maybe")

    assert proc.returncode != 0
    assert "DEBUG='maybe' is not a boolean" in proc.stderr


def test_it_routes_model_tasks_to_the_gpu_queue_and_the_rest_to_cpu() -> None:
    from studyapp.celery import app

    def queue_of(task_name: str) -> tuple[str, str, str]:
        queue = app.amqp.router.route({}, task_name)["queue"]
        return queue.name, queue.exchange.name, queue.routing_key

    # Exchange and routing key too: a queue bound with another queue's key would get copies of its tasks.
    assert queue_of("worker.tasks.synth_generate") == ("cpu", "cpu", "cpu")
    assert queue_of("worker.tasks.personalize_participant") == ("gpu", "gpu", "gpu")
    assert queue_of("worker.tasks.train_fspo") == ("gpu", "gpu", "gpu")
    assert queue_of("worker.tasks.train_checkpoint") == ("gpu", "gpu", "gpu")
    assert queue_of("worker.tasks.evaluate_arms") == ("gpu", "gpu", "gpu")
    assert queue_of("worker.tasks.anything_else") == ("cpu", "cpu", "cpu")


@pytest.mark.django_db
def test_it_runs_the_test_database_on_what_database_url_names() -> None:
    expected = "postgresql" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "sqlite"

    assert connection.vendor == expected
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
