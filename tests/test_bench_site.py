"""bench/bench_site.py, at its smallest, in each mode: a few simulated participants through the real site
(daphne or the production server, PostgreSQL, Redis, a Celery worker, the tiny model), double-clicks and
stale POSTs included. It checks what the bench counts and that the report has its fields, never how fast
anything was."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
# The bench flushes its Redis database: one of its own, apart from the suite's (REDIS_URL's and the
# worker's TEST_WORKER_REDIS_DB).
BENCH_REDIS_DB = int(os.environ.get("TEST_BENCH_REDIS_DB", "6"))

pytestmark = pytest.mark.slow


def bench_run(tmp_path: Path, *options: str) -> dict[str, Any]:
    """Run the bench with `options` on a database and a Redis database of its own; its results."""
    database_url, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if not database_url.startswith("postgres") or not redis_url:
        pytest.fail("the site bench needs PostgreSQL and Redis: run it with ./run test")
    # A database beside the suite's, named after it, so two suites on one server keep apart.
    name = urlsplit(database_url).path.lstrip("/") or "test"
    bench_db = urlsplit(database_url)._replace(path=f"/{name}_bench_site").geturl()
    bench_redis = urlsplit(redis_url)._replace(path=f"/{BENCH_REDIS_DB}").geturl()
    out = tmp_path / "results.json"
    argv = [sys.executable, "bench/bench_site.py", *options]
    argv += ["--workers", "1", "--max-new-tokens", "4", "--timeout", "240"]
    argv += ["--database-url", bench_db, "--redis-url", bench_redis, "--out", str(out)]

    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=420)

    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results: dict[str, Any] = json.loads(out.read_text())
    assert results["ok"]
    assert results["errors"] == 0
    for check in results["database"].values():
        assert check["found"] == check["expected"] == check["acknowledged"]
    assert results["personalize_tasks_s"]["skipped_as_already_done"] == 0
    return results


def test_it_stores_every_judgment_of_concurrent_participants_once(tmp_path: Path) -> None:
    results = bench_run(tmp_path, "--participants", "3", "--sequential", "1")

    assert results["load"]["completed"] == 3
    assert results["load"]["errors"] == 0
    kinds = {row["kind"] for row in results["load"]["latency_ms"]}
    assert {"POST pick (double-click)", "POST pick (stale)", "POST rate (stale)"} <= kinds
    load = results["database"]["load test"]
    assert load["found"]["elicitation picks"] == 3 * 4
    assert load["found"]["ratings"] == 3 * results["settings"]["ratings"]


def test_it_paces_participants_as_people_on_the_production_server(tmp_path: Path) -> None:
    options = ["--mode", "human", "--server", "production", "--web-workers", "2", "--participants", "3"]
    results = bench_run(tmp_path, *options, "--arrival-s", "1", "--think-scale", "0.01")

    human = results["human"]
    assert human["completed"] == 3
    assert results["database"]["human pacing"]["found"]["ratings"] == 3 * results["settings"]["ratings"]
    kinds = {row["kind"] for row in human["latency_ms"]}
    assert {"all pages (not the status polls)", "GET status", "POST consent", "POST pick"} <= kinds
    assert set(human["goal"]) == {"page_p95_ms", "page_p99_ms", "errors", "found", "met"}
    assert human["last_pick_to_ready_s"]["database clock"]["n"] == 3
    assert "log-normal" in human["think_time"]


def test_it_stresses_both_servers_in_one_run_and_profiles_the_slowest_page(tmp_path: Path) -> None:
    options = ["--mode", "stress", "--servers", "daphne,production", "--web-workers", "2"]
    results = bench_run(tmp_path, *options, "--levels", "2", "--level-s", "2", "--profile-participants", "1")

    assert set(results["stress"]) == {"daphne", "production"}
    for server in results["stress"].values():
        (level,) = server["levels"]
        assert level["participants_at_once"] == 2
        assert level["requests"] > 0
        assert set(server["capacity"]) == {
            "requests_per_s",
            "pages_per_s",
            "participants_at_once",
            "p95_limit_passed",
        }
        assert server["completed"] == server["participants_walked"] >= 2
    profile = results["profile"]
    assert profile["page"] == results["stress"]["daphne"]["levels"][0]["slowest_page"]
    assert profile["requests"] >= 1
    assert profile["top_frames"] and profile["by_area"]
    assert results["database"]["profile"]["found"]["participants completed"] == 2
