"""bench/bench_site.py, at its smallest: a few simulated participants through the real site (daphne,
PostgreSQL, Redis, a Celery worker, the tiny model), double-clicks and stale POSTs included. It checks
what the bench counts, never how fast anything was."""

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
# The bench flushes its Redis database: one of its own, apart from the suite's (REDIS_URL's and the
# worker's TEST_WORKER_REDIS_DB).
BENCH_REDIS_DB = int(os.environ.get("TEST_BENCH_REDIS_DB", "6"))

pytestmark = pytest.mark.slow


def test_it_stores_every_judgment_of_concurrent_participants_once(tmp_path: Path) -> None:
    database_url, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if not database_url.startswith("postgres") or not redis_url:
        pytest.fail("the site bench needs PostgreSQL and Redis: run it with ./run test")
    # A database beside the suite's, named after it, so two suites on one server keep apart.
    name = urlsplit(database_url).path.lstrip("/") or "test"
    bench_db = urlsplit(database_url)._replace(path=f"/{name}_bench_site").geturl()
    bench_redis = urlsplit(redis_url)._replace(path=f"/{BENCH_REDIS_DB}").geturl()
    out = tmp_path / "results.json"
    argv = [sys.executable, "bench/bench_site.py", "--participants", "3", "--sequential", "1"]
    argv += ["--workers", "1", "--max-new-tokens", "4", "--timeout", "240"]
    argv += ["--database-url", bench_db, "--redis-url", bench_redis, "--out", str(out)]

    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=420)

    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["ok"]
    assert results["load"]["completed"] == 3
    assert results["load"]["errors"] == 0
    kinds = {row["kind"] for row in results["load"]["latency_ms"]}
    assert {"POST pick (double-click)", "POST pick (stale)", "POST rate (stale)"} <= kinds
    load = results["database"]["load test"]
    assert load["found"] == load["expected"]
    assert load["found"]["elicitation picks"] == 3 * 4
    assert load["found"]["ratings"] == 3 * results["settings"]["ratings"]
    assert results["personalize_tasks_s"]["skipped_as_already_done"] == 0
