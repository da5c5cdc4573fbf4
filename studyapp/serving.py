"""The production web server, as `./run serve` starts it: gunicorn, a master process that keeps WEB_WORKERS
uvicorn worker processes running on one port, each serving `studyapp.asgi:application` (the pages, and
the Channels WebSockets through uvicorn's `websockets` library) on its own event loop.

Every process has its own psycopg pool of up to DB_POOL_MAX_SIZE connections (studyapp.settings), so the
web server alone may hold WEB_WORKERS x DB_POOL_MAX_SIZE of PostgreSQL's max_connections; what is left
must cover the Celery workers (one connection per worker process) and the coordinator's own sessions
(docs/coordinator-guide.md, "Deploying for a real study").

The master loads no Django settings: it only supervises, and each worker loads them.
"""

import os
import sys
from dataclasses import dataclass

from django.core.exceptions import ImproperlyConfigured

from studyapp.env import env_bool, env_int, env_str

APPLICATION = "studyapp.asgi:application"
WORKER_CLASS = "uvicorn_worker.UvicornWorker"


def cpu_count() -> int:
    """The CPUs this process may run on (a container's or `taskset`'s share, not the machine's)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class WebServer:
    """How the web server runs; every field from the environment (`web_server_from_env`)."""

    bind: str = "127.0.0.1:8000"  # WEB_BIND: behind a proxy on this host; 0.0.0.0:8000 for one elsewhere
    # WEB_WORKERS: one process per CPU (each is a single event loop; a page's view runs in a thread of it).
    workers: int = 2
    # WEB_TIMEOUT_S: a worker that has not told the master it is alive for this long is killed and
    # replaced (a blocked event loop); requests themselves have no limit here.
    timeout_s: int = 60
    # WEB_GRACEFUL_TIMEOUT_S: on SIGTERM each worker stops accepting, finishes what it is answering and
    # closes its sockets (browsers reconnect to another process); killed if it takes longer.
    graceful_timeout_s: int = 30
    keepalive_s: int = 5  # WEB_KEEPALIVE_S: an idle keep-alive connection from the proxy is closed after this
    access_log: bool = False  # WEB_ACCESS_LOG: the proxy logs every request already

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ImproperlyConfigured(f"WEB_WORKERS={self.workers}: at least one worker is needed")


def web_server_from_env() -> WebServer:
    """The web server the environment asks for; each unset knob takes WebServer's default (the workers:
    one per CPU, at least 2, so that a worker being replaced never leaves the site unanswered)."""
    return WebServer(
        bind=env_str("WEB_BIND", WebServer.bind),
        workers=env_int("WEB_WORKERS", max(2, cpu_count())),
        timeout_s=env_int("WEB_TIMEOUT_S", WebServer.timeout_s),
        graceful_timeout_s=env_int("WEB_GRACEFUL_TIMEOUT_S", WebServer.graceful_timeout_s),
        keepalive_s=env_int("WEB_KEEPALIVE_S", WebServer.keepalive_s),
        access_log=env_bool("WEB_ACCESS_LOG", WebServer.access_log),
    )


def gunicorn_argv(server: WebServer) -> list[str]:
    """gunicorn's command line for `server` (without the program's name)."""
    argv = [APPLICATION, "--worker-class", WORKER_CLASS, "--workers", str(server.workers)]
    argv += ["--bind", server.bind, "--timeout", str(server.timeout_s)]
    argv += ["--graceful-timeout", str(server.graceful_timeout_s), "--keep-alive", str(server.keepalive_s)]
    # Errors and the workers' starts and exits to stderr, requests to stdout only when asked for.
    argv += ["--error-logfile", "-", *(["--access-logfile", "-"] if server.access_log else [])]
    # gunicorn's control socket is one path per user (~/.gunicorn): two servers on a host would share it.
    argv += ["--no-control-socket"]
    return argv


def main() -> None:
    """Replace this process with gunicorn (so a process manager's SIGTERM reaches its master directly)."""
    server = web_server_from_env()
    print(
        f"serving {APPLICATION} on {server.bind}: {server.workers} worker processes, each with a database "
        "pool of up to DB_POOL_MAX_SIZE connections",
        file=sys.stderr,
    )
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    os.execv(gunicorn, [gunicorn, *gunicorn_argv(server), *sys.argv[1:]])


if __name__ == "__main__":
    main()
