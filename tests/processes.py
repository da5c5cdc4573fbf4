"""Real processes the end-to-end tests run the site on, each one a test may kill and start again: the site
itself (daphne, started as the demo and the bench start it: studyapp.demo_site.server_start), a Redis
server of the test's own, and a PostgreSQL cluster of the test's own."""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import redis

from studyapp.demo_site import SERVER_LISTENING, START_TIMEOUT_S, Child, server_start
from tests.conftest import REPO, closed_port


def site_env(*, database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    """This process's environment for a site process on `database_url` and `redis_url` (its Celery broker
    and result backend, and its channel layer), with `extra` settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DJANGO_ALLOW_ASYNC_UNSAFE")
    }
    # Without the pool (DB_POOL_MAX_SIZE=0) no connection outlives its request; the pool's end with the
    # process, which a test stops before its database is flushed or dropped.
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, DB_CONN_MAX_AGE="0", **extra)
    return env


@dataclass
class Site:
    """A running site process and where it answers (http://127.0.0.1:<port>, no trailing slash)."""

    child: Child
    url: str

    @property
    def log(self) -> Path:
        return self.child.log

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to finish a request or close a connection."""
        self.child.proc.kill()
        self.child.proc.wait()

    def stop(self) -> None:
        self.child.stop(timeout_s=10)


def site_server_start(log_dir: Path, *, env: dict[str, str], port: int = 0) -> Site:
    """daphne serving the site on 127.0.0.1:`port` (0: a port the OS picks) in `env` (site_env), once it
    listens and its health check answers."""
    log_dir.mkdir(parents=True, exist_ok=True)
    child = server_start(log_dir, host="127.0.0.1", port=port, env=env)
    try:
        site = Site(child, f"http://{child.wait_for(SERVER_LISTENING, START_TIMEOUT_S)[1]}")
        with urllib.request.urlopen(f"{site.url}/healthz", timeout=30) as response:
            assert response.status == 200, child.log_tail()
    except BaseException:
        child.stop(timeout_s=10)
        raise
    return site


class RedisServer:
    """A redis-server of the test's own on a free loopback port, without persistence (a restart starts
    empty, like a Redis that lost its data)."""

    def __init__(self, log: Path) -> None:
        self.port = closed_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        with redis.Redis.from_url(self.url) as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start:\n{self.log.read_text()}") from None
                    time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _postgres_bin() -> Path:
    """The newest installed PostgreSQL's programs (Debian: /usr/lib/postgresql/<version>/bin)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise RuntimeError(
            "no PostgreSQL server programs under /usr/lib/postgresql (apt-get install postgresql)"
        )
    return versions[-1].parent


class PostgresCluster:
    """A PostgreSQL cluster of the test's own (initdb into a temporary folder owned by the postgres
    user, its socket there too) on a free loopback port, with trust authentication."""

    USER = "postgres"

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.port = closed_port()
        self.dir = Path(tempfile.mkdtemp(prefix="fspo-pg-"))
        account = pwd.getpwnam(self.USER)
        os.chown(self.dir, account.pw_uid, account.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", self.USER, "--no-sync")

    def _as_postgres(self, program: str, *args: str) -> None:
        argv = ["runuser", "-u", self.USER, "--", str(self.bin / program), *args]
        done = subprocess.run(argv, cwd=self.dir, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def url(self, database: str) -> str:
        return f"postgres://{self.USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-o", options, "start")

    def stop(self) -> None:
        """A fast shutdown: open transactions are rolled back and every connection is closed."""
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> None:
        self._as_postgres("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, name)

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_postgres("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def django_run(code: str, *, database_url: str) -> str:
    """Run `code` in a Python process with Django set up on `database_url`; what it printed."""
    env = {**os.environ, "DATABASE_URL": database_url, "DJANGO_SETTINGS_MODULE": "studyapp.settings"}
    argv = [sys.executable, "-c", f"import django\ndjango.setup()\n{code}"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"the Django script failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout
