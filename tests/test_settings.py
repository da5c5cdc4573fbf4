import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from pytest_django.fixtures import Settings

from tests.factories import make_participant, make_study
from tests.support import browser_of

REPO = Path(__file__).resolve().parent.parent
KNOBS = (
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "DEBUG",
    "SECRET_KEY",
    "PARTICIPANT_ID_KEY",
    "SECRET_KEY_FILE",
    "PARTICIPANT_ID_KEY_FILE",
    "ALLOWED_HOSTS",
    "HTTPS",
    "PROXY_SETS_X_FORWARDED_PROTO",
    "CSRF_TRUSTED_ORIGINS",
    "STATIC_COLLECTED",
    "STATIC_ROOT",
)
PRODUCTION_ENV = REPO / "docs" / "deploy" / "production.env"

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
    "secret_key": settings.SECRET_KEY,
    "participant_id_key": settings.PARTICIPANT_ID_KEY,
    "allowed_hosts": settings.ALLOWED_HOSTS,
    "csrf_trusted_origins": settings.CSRF_TRUSTED_ORIGINS,
    "secure_proxy_ssl_header": getattr(settings, "SECURE_PROXY_SSL_HEADER", None),
    "secure_ssl_redirect": settings.SECURE_SSL_REDIRECT,
    "secure_cookies": [settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE],
    "hsts": [settings.SECURE_HSTS_SECONDS, settings.SECURE_HSTS_INCLUDE_SUBDOMAINS, settings.SECURE_HSTS_PRELOAD],
    "staticfiles": settings.STORAGES["staticfiles"]["BACKEND"],
}))
"""


def knobs_only(*, debug: str | None = "true", **env: str) -> dict[str, str]:
    """This process's environment with exactly these deploy knobs set (DEBUG on unless `debug` says
    otherwise; None leaves it unset, the deployment default)."""
    base = {k: v for k, v in os.environ.items() if k not in KNOBS}
    base["DJANGO_SETTINGS_MODULE"] = "studyapp.settings"
    if debug is not None:
        base["DEBUG"] = debug
    return {**base, **env}


def run_settings(*, debug: str | None = "true", **env: str) -> subprocess.CompletedProcess[str]:
    """Load studyapp.settings in a fresh interpreter with exactly these deploy knobs set."""
    return subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS],
        cwd=REPO,
        env=knobs_only(debug=debug, **env),
        capture_output=True,
        text=True,
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


def test_it_refuses_a_personalization_batch_of_fewer_than_one_participant() -> None:
    proc = run_settings(PERSONALIZE_BATCH_MAX="0")

    assert proc.returncode != 0
    assert "PERSONALIZE_BATCH_MAX must be at least 1" in proc.stderr


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


def production_env(tmp_path: Path) -> dict[str, str]:
    """docs/deploy/production.env as a deployment fills it in: its secrets' files written (under
    tmp_path, like STATIC_ROOT), the rest as the file has it."""
    env = {}
    for line in PRODUCTION_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    for name in ("SECRET_KEY_FILE", "PARTICIPANT_ID_KEY_FILE"):
        secret = tmp_path / name.lower()
        secret.write_text(f"{secrets.token_urlsafe(48)}\n")
        env[name] = str(secret)
    env["STATIC_ROOT"] = str(tmp_path / "static")
    return env


def test_the_documented_production_environment_passes_djangos_deployment_checks(tmp_path: Path) -> None:
    env = knobs_only(debug=None, **production_env(tmp_path))
    argv = [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"]

    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "System check identified no issues (0 silenced)." in proc.stdout
    assert "WARNING" not in proc.stderr


def test_https_turns_on_the_secure_defaults() -> None:
    seen = settings_under(HTTPS="true")

    assert seen["secure_ssl_redirect"] is True
    assert seen["secure_cookies"] == [True, True]
    assert seen["hsts"] == [365 * 24 * 3600, False, False]
    assert seen["secure_proxy_ssl_header"] is None  # trusted only when the proxy is said to set it


def test_it_reads_the_secrets_from_the_files_named_by_the_environment(tmp_path: Path) -> None:
    (tmp_path / "secret-key").write_text("a-secret-from-a-file\n")
    (tmp_path / "participant-id-key").write_text("another-secret-from-a-file\n")

    proc = run_settings(
        debug=None,
        SECRET_KEY_FILE=str(tmp_path / "secret-key"),
        PARTICIPANT_ID_KEY_FILE=str(tmp_path / "participant-id-key"),
    )

    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert (seen["secret_key"], seen["participant_id_key"]) == (
        "a-secret-from-a-file",
        "another-secret-from-a-file",
    )


def test_it_refuses_a_secret_given_both_ways_or_from_a_missing_file(tmp_path: Path) -> None:
    both = run_settings(SECRET_KEY="one", SECRET_KEY_FILE=str(tmp_path / "secret-key"))
    missing = run_settings(SECRET_KEY_FILE=str(tmp_path / "absent"))

    assert both.returncode != 0 and "set SECRET_KEY or SECRET_KEY_FILE, not both" in both.stderr
    assert missing.returncode != 0 and "SECRET_KEY_FILE=" in missing.stderr
    assert "cannot be read" in missing.stderr


def test_it_serves_the_static_files_collected_and_compressed_only_when_told_they_were() -> None:
    assert settings_under()["staticfiles"] == "django.contrib.staticfiles.storage.StaticFilesStorage"
    assert (
        settings_under(STATIC_COLLECTED="true")["staticfiles"]
        == "whitenoise.storage.CompressedManifestStaticFilesStorage"
    )


# A participant's consent form, posted through a TLS-terminating proxy: the browser is on
# https://study.example.org; the proxy passes Host and says X-Forwarded-Proto: https.
PROXY_HEADERS = {"host": "study.example.org", "x-forwarded-proto": "https"}


def _consent_posted_through_the_proxy(settings: Settings, seen: dict[str, Any]) -> int:
    """Apply the proxy-related settings the environment gave (`seen`), then post a participant's
    consent with CSRF checks on, as their browser would; the response's status."""
    settings.ALLOWED_HOSTS = seen["allowed_hosts"]
    settings.CSRF_TRUSTED_ORIGINS = seen["csrf_trusted_origins"]
    settings.SECURE_SSL_REDIRECT = seen["secure_ssl_redirect"]
    if seen["secure_proxy_ssl_header"]:
        settings.SECURE_PROXY_SSL_HEADER = tuple(seen["secure_proxy_ssl_header"])
    participant = make_participant(make_study())
    browser = browser_of(participant, enforce_csrf_checks=True)
    consent = f"/s/{participant.study.slug}/consent/"
    page = browser.get(consent, headers=PROXY_HEADERS)
    assert page.status_code == 200
    token = browser.cookies[settings.CSRF_COOKIE_NAME].value
    response = browser.post(
        consent,
        {"decision": "agree", "csrfmiddlewaretoken": token},
        headers={**PROXY_HEADERS, "origin": "https://study.example.org"},
    )
    return response.status_code


@pytest.mark.django_db
def test_a_form_posted_through_a_tls_proxy_is_refused_from_an_origin_it_was_not_told_of(
    settings: Settings,
) -> None:
    seen = settings_under(ALLOWED_HOSTS="study.example.org")

    assert _consent_posted_through_the_proxy(settings, seen) == 403


@pytest.mark.django_db
def test_a_form_posted_through_a_tls_proxy_is_accepted_from_a_trusted_origin(
    settings: Settings,
) -> None:
    seen = settings_under(ALLOWED_HOSTS="study.example.org", CSRF_TRUSTED_ORIGINS="https://study.example.org")

    assert _consent_posted_through_the_proxy(settings, seen) == 302  # on to the instructions


@pytest.mark.django_db
def test_a_form_posted_through_a_tls_proxy_it_trusts_is_accepted_over_https(
    settings: Settings,
) -> None:
    seen = settings_under(
        ALLOWED_HOSTS="study.example.org", HTTPS="true", PROXY_SETS_X_FORWARDED_PROTO="true"
    )

    assert seen["secure_proxy_ssl_header"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert _consent_posted_through_the_proxy(settings, seen) == 302  # not redirected to https: it is
