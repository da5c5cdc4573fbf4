"""Settings for the study platform.

Every deploy knob is read from the environment, and every default works with nothing configured:
SQLite under var/, an embedded Celery broker (no server), an in-memory channel layer.
Production and CI set DATABASE_URL (PostgreSQL) and REDIS_URL (Celery broker + results, channel layer).
"""

from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

from studyapp.env import env_bool, env_int, env_list, env_secret, env_str
from studyapp.queue import CPU, EXPIRE_PARTICIPANTS, GPU, SWEEP_STALE_WORK, task_routes

BASE_DIR = Path(__file__).resolve().parent.parent
# Local state of the embedded defaults: the SQLite database, the serverless Celery broker and results.
VAR_DIR = BASE_DIR / "var"
VAR_DIR.mkdir(exist_ok=True)

# Off unless asked for: a site started with nothing configured must not show tracebacks to visitors.
# `./run demo` turns it on (DEBUG=true), and the test run gives itself its keys (`./run test`).
DEBUG = env_bool("DEBUG", False)

# The fallback key is for development only (DEBUG=true): it is public, so anyone could forge sessions
# with it. A deployment (DEBUG off) must set SECRET_KEY (or SECRET_KEY_FILE), and refuses to start without it.
SECRET_KEY = env_secret("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is false")
    SECRET_KEY = "dev-only-insecure-key-do-not-deploy"

# Participants' recruitment ids (PROLIFIC_PID) are stored only as an HMAC under this key, so the same id
# maps back to the same participant while the table never holds the id itself. It is separate from
# SECRET_KEY so that rotating the session key does not orphan every participant; keep it stable and
# secret for the life of the studies (like SECRET_KEY, a deployment must set it, or PARTICIPANT_ID_KEY_FILE).
PARTICIPANT_ID_KEY = env_secret("PARTICIPANT_ID_KEY")
if not PARTICIPANT_ID_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("PARTICIPANT_ID_KEY must be set when DEBUG is false")
    PARTICIPANT_ID_KEY = "dev-only-participant-id-key"


ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")

# ---------------------------------------------------------------------------------------------------
# HTTPS. A real study is served over HTTPS by a TLS-terminating proxy (nginx, Caddy) in front of
# `./run serve` (docs/coordinator-guide.md, "Deploying for a real study"). HTTPS=true turns on every
# secure default below; each can still be set on its own. Off by default: the demo and the tests are
# plain HTTP on this machine.
HTTPS = env_bool("HTTPS", False)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", HTTPS)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", HTTPS)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", HTTPS)
# Browsers that saw the header refuse plain HTTP for this long: a year, as the preload list asks.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 365 * 24 * 3600 if HTTPS else 0)
# Both widen HSTS past this host name (to its subdomains; into browsers' built-in lists once submitted):
# asked for, never implied by HTTPS.
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# The server (uvicorn) already takes X-Forwarded-Proto and X-Forwarded-For from a proxy at an address in
# FORWARDED_ALLOW_IPS (default 127.0.0.1: a proxy on the same host). Django trusts the header itself only
# when told the proxy always sets it (PROXY_SETS_X_FORWARDED_PROTO=true): a client reaching the server
# directly could otherwise claim HTTPS.
if env_bool("PROXY_SETS_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# The host name the browser used, from a proxy that passes it in X-Forwarded-Host instead of Host.
USE_X_FORWARDED_HOST = env_bool("USE_X_FORWARDED_HOST", False)
# Origins (https://study.example.org) whose form posts are accepted when the site does not see the
# browser's own scheme and host (a proxy that rewrites them).
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "daphne",  # first, so that `manage.py runserver` serves ASGI (HTTP + WebSocket)
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "studyapp",
    "annotation",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",  # static files (STATIC_COLLECTED below)
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # A database that is down answers "briefly unavailable" (503), not a server error (500).
    "studyapp.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "studyapp.urls"
WSGI_APPLICATION = "studyapp.wsgi.application"
ASGI_APPLICATION = "studyapp.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# DATABASE_URL=postgres://user@host:5432/name switches to PostgreSQL (psycopg 3). Django's test runner
# creates and drops its own database beside it, named test_<name>.
DATABASE_URL = env_str("DATABASE_URL", "")
# Under ASGI every request runs its view in a thread of its own, and each thread would open (and, with
# persistent connections, keep) a connection of its own: 50 concurrent participants exhausted
# PostgreSQL's 100 connections (bench/bench_site.py). So each process borrows from a bounded psycopg pool
# (DB_POOL_MAX_SIZE, default 20; 0 turns pooling off and DB_CONN_MAX_AGE applies instead).
DB_POOL_MAX_SIZE = env_int("DB_POOL_MAX_SIZE", 20)
# Plain dicts of Django's settings, not dj_database_url's DBConfig: SQLite's NAME below is a Path.
DATABASES: dict[str, dict[str, Any]]
if DATABASE_URL:
    DATABASES = {
        "default": dict(
            dj_database_url.parse(
                DATABASE_URL,
                conn_max_age=0 if DB_POOL_MAX_SIZE else env_int("DB_CONN_MAX_AGE", 0),
                # With the pool, this checks each connection as the pool lends it (Django gives the pool
                # ConnectionPool.check_connection): after PostgreSQL restarts the pool's idle
                # connections are dead, and each would otherwise fail one request before it was replaced.
                conn_health_checks=True,
            )
        )
    }
    if DB_POOL_MAX_SIZE and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": 1,
            "max_size": DB_POOL_MAX_SIZE,
            "timeout": env_int("DB_POOL_TIMEOUT", 30),
        }
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": VAR_DIR / "db.sqlite3"}}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the worker are two processes writing one file. WAL lets reads run beside a write;
    # IMMEDIATE takes the write lock at BEGIN, so two writers queue on the busy timeout instead of one
    # failing at once with "database is locked" when its read lock cannot be upgraded.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        init_command="PRAGMA journal_mode=WAL", transaction_mode="IMMEDIATE", timeout=20
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# The coordinators' studio (/studio/): staff users (or members of the "coordinators" group) sign in here.
LOGIN_URL = "studio-login"
LOGIN_REDIRECT_URL = "studio-home"
LOGOUT_REDIRECT_URL = "studio-login"
# Where the studio's jobs write (datasets/, checkpoints/, evaluations/) and the only folder its pages read
# datasets and checkpoints from. Workers must see it at the same path (a shared volume in production).
STUDIO_DATA_DIR = env_str("STUDIO_DATA_DIR", str(VAR_DIR / "studio"))
# The largest question-pool file a coordinator may upload.
POOL_UPLOAD_MAX_BYTES = env_int("POOL_UPLOAD_MAX_BYTES", 10 * 1024 * 1024)

# Static files: WhiteNoise (in MIDDLEWARE) answers them in every web process, before the session and the
# views, so no separate file server is needed. STATIC_COLLECTED=true (`./run serve` sets it, after
# `manage.py collectstatic` into STATIC_ROOT): from STATIC_ROOT, under content-hashed names that browsers
# cache for a year, gzip- and Brotli-compressed ahead of time. Off (the default, so that a page renders
# without collectstatic: the demo, the tests): from the apps' static/ folders, under their own names.
STATIC_URL = env_str("STATIC_URL", "static/")
STATIC_ROOT = env_str("STATIC_ROOT", str(VAR_DIR / "static"))
STATIC_COLLECTED = env_bool("STATIC_COLLECTED", False)
WHITENOISE_USE_FINDERS = not STATIC_COLLECTED
if not STATIC_COLLECTED:
    Path(STATIC_ROOT).mkdir(parents=True, exist_ok=True)  # WhiteNoise looks there too, and warns if absent
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if STATIC_COLLECTED
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}

REDIS_URL = env_str("REDIS_URL", "")

# Celery (read by studyapp/celery.py through the CELERY_ namespace). Without REDIS_URL the broker and
# the result backend are SQLite files under var/, so `./run demo` needs no server.
CELERY_BROKER_URL = env_str(
    "CELERY_BROKER_URL", REDIS_URL or f"sqla+sqlite:///{VAR_DIR / 'celery-broker.sqlite'}"
)
CELERY_RESULT_BACKEND = env_str(
    "CELERY_RESULT_BACKEND", REDIS_URL or f"db+sqlite:///{VAR_DIR / 'celery-results.sqlite'}"
)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # With acks_late Redis re-delivers a task still unacknowledged after this many seconds, so it must
    # outlast the longest job (training runs for hours). (The SQLAlchemy transport takes no such option:
    # it hands its transport options to create_engine.)
    # A redelivered job or generation that is still running on a live worker is skipped (its heartbeat
    # is fresh), and one whose worker died is queued again by the stale-work sweeper long before this.
    # A broker host that drops packets fails a connection after socket_connect_timeout seconds rather
    # than the system's TCP time-out: the web request that sends a task (the last pick) never hangs on it.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 12 * 3600),
        "socket_connect_timeout": env_int("CELERY_BROKER_CONNECT_TIMEOUT_S", 2),
    }
# Sending a task retries once, then gives up: a pick the broker cannot take stays queued, unsent, and the
# stale-work sweeper sends it once the broker is back (services.personalization), so the participant's
# request answers at once instead of waiting on Celery's longer default retries.
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}
# Two queues: `gpu` (one worker per GPU, concurrency 1) for model work, `cpu` for everything else.
# Each queue has its own exchange and routing key: a bare Queue("gpu") would be bound to the default
# exchange with the default queue's key and receive a copy of every `cpu` message.
CELERY_TASK_QUEUES = tuple(Queue(name, Exchange(name), routing_key=name) for name in (CPU, GPU))
CELERY_TASK_DEFAULT_QUEUE = CPU
# Each task's queue, by the names the tasks are registered and enqueued under (studyapp.queue).
CELERY_TASK_ROUTES = task_routes()
# A task is acknowledged only once it has finished, and one whose worker died goes back on the queue;
# each worker process holds at most one unstarted task, so a long GPU job never sits on a queued one.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TRACK_STARTED = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]

# Celery beat (`celery -A studyapp beat`): time out participants inactive past their study's time limit
# every PARTICIPANT_EXPIRY_INTERVAL_S seconds (worker.tasks.expire_participants, on the cpu queue).
# Work whose worker died (SIGKILL, a lost host) or whose task never reached the broker is found by the
# stale-work sweeper (worker.tasks.sweep_stale_work), run by beat every STALE_WORK_SWEEP_S and by each
# worker as it starts: a worker beats every HEARTBEAT_INTERVAL_S while it runs a generation or a job,
# and one silent for STALE_WORK_AFTER_S is queued again (a job resumes from its checkpoint); a
# generation queued but never handed to the broker is sent. (The broker's own redelivery of an
# unacknowledged task waits for CELERY_VISIBILITY_TIMEOUT, sized for the longest training run.)
HEARTBEAT_INTERVAL_S = env_int("HEARTBEAT_INTERVAL_S", 5)
STALE_WORK_AFTER_S = env_int("STALE_WORK_AFTER_S", 30)
STALE_WORK_SWEEP_S = env_int("STALE_WORK_SWEEP_S", 15)
if STALE_WORK_AFTER_S <= 2 * HEARTBEAT_INTERVAL_S:
    raise ImproperlyConfigured("STALE_WORK_AFTER_S must be more than twice HEARTBEAT_INTERVAL_S")

CELERY_BEAT_SCHEDULE = {
    "expire-participants": {
        "task": EXPIRE_PARTICIPANTS,
        "schedule": env_int("PARTICIPANT_EXPIRY_INTERVAL_S", 300),
    },
    "sweep-stale-work": {"task": SWEEP_STALE_WORK, "schedule": STALE_WORK_SWEEP_S},
}

# personalize(participant_id) on the gpu queue: retried with exponential back-off from
# PERSONALIZE_RETRY_DELAY_S, at most PERSONALIZE_MAX_RETRIES times, then the participant is told it failed.
# The soft limit raises inside the task (so it is retried like any error); the hard one kills it.
PERSONALIZE_MAX_RETRIES = env_int("PERSONALIZE_MAX_RETRIES", 2)
PERSONALIZE_RETRY_DELAY_S = env_int("PERSONALIZE_RETRY_DELAY_S", 10)
PERSONALIZE_TIME_LIMIT_S = env_int("PERSONALIZE_TIME_LIMIT_S", 600)
# A personalize task also generates, in the same batch, up to this many participants in all of its study
# who wait at the moment it starts (services.participant_generations_claim): a GPU host serves many at
# once. 1: one participant per task. The time limits above cover the whole batch.
PERSONALIZE_BATCH_MAX = env_int("PERSONALIZE_BATCH_MAX", 8)
if PERSONALIZE_BATCH_MAX < 1:
    raise ImproperlyConfigured("PERSONALIZE_BATCH_MAX must be at least 1")
# Where a worker runs local checkpoints (hf:/dir or a bare directory): "cuda" on a GPU host.
GENERATION_DEVICE = env_str("GENERATION_DEVICE", "cpu")
GENERATION_DTYPE = env_str("GENERATION_DTYPE", "float32")

if REDIS_URL:
    # channels-redis waits for a socket's next message in blocking reads of 5 s (BZPOPMIN). redis-py 8 gives
    # every connection a 5 s read timeout by default, which then fires first and drops any socket left
    # idle that long (the waiting page's, for one): reads get a timeout well past the blocking read.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
