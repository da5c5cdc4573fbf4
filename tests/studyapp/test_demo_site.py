"""The demo site (`manage.py demo_site`): the study and account it makes, and its --check run in real
processes (daphne, a Celery worker on the SQLAlchemy broker, SQLite, the in-memory channel layer) with a
tiny real model, which is what `./run demo --check` does after training."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.contrib.auth import authenticate

from annotation.models import CandidatePair, Question
from studyapp.demo_site import DemoStudy, _port_free, demo_coordinator_ensure, demo_study_ensure
from studyapp.models import Arm
from tests.conftest import REPO, stop_process
from tests.support import process_alive
from tests.worker.conftest import tiny_checkpoint  # noqa: F401  (the same tiny real model as the worker tests)

SERVICE_KNOBS = ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "STUDIO_DATA_DIR")


@pytest.fixture(scope="module")
def small_elix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modeling.synth import generate_dataset

    path = tmp_path_factory.mktemp("datasets") / "elix"
    generate_dataset(out_dir=path, domain="elix", users=12, pairs_per_user=4, seed=0)
    return path


@pytest.mark.django_db
def test_it_makes_the_demo_study_once_and_reuses_it(small_elix: Path, tmp_path: Path) -> None:
    spec = DemoStudy(slug="elix-test", dataset=small_elix, fspo=tmp_path / "fspo", base=tmp_path / "base")

    study, created = demo_study_ensure(spec)
    again, created_again = demo_study_ensure(spec)

    assert (created, created_again, again.pk) == (True, False, study.pk)
    assert study.is_open and study.domain == "elix" and study.completion_code == "ELIX-TEST-DONE"
    arms = {arm.name: (arm.method, arm.checkpoint) for arm in study.arms.all()}
    assert arms == {
        "FSPO": (Arm.Method.FSPO, str(tmp_path / "fspo")),
        "base": (Arm.Method.NO_CONTEXT, str(tmp_path / "base")),
    }
    assert [(c.arm.name, c.baseline.name) for c in study.comparisons.all()] == [("FSPO", "base")]
    assert CandidatePair.objects.filter(question__study=study).count() == spec.pool_pairs
    assert Question.objects.filter(study=study, use="evaluation").count() == spec.pool_questions


@pytest.mark.django_db
def test_it_keeps_the_demo_coordinators_password_across_runs(tmp_path: Path) -> None:
    password_file = tmp_path / "coordinator-password.txt"

    username, password = demo_coordinator_ensure(password_file=password_file)

    assert demo_coordinator_ensure(password_file=password_file) == (username, password)
    assert authenticate(username=username, password=password).is_staff
    assert password_file.stat().st_mode & 0o077 == 0


@pytest.mark.slow
def test_its_check_walks_a_participant_through_the_whole_platform_in_real_processes(
    small_elix: Path,
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_KNOBS}
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'site.sqlite3'}",
        CELERY_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        CELERY_RESULT_BACKEND=f"db+sqlite:///{tmp_path / 'results.sqlite'}",
    )
    argv = [sys.executable, "manage.py", "demo_site", "--check", "--slug", "elix-test"]
    argv += ["--dataset", str(small_elix), "--fspo", str(tiny_checkpoint), "--base", str(tiny_checkpoint)]
    argv += ["--picks", "2", "--eval-questions", "2", "--max-new-tokens", "8"]
    argv += ["--site-dir", str(tmp_path), "--port", "0", "--check-timeout", "60"]
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the demo stops its server and worker on SIGTERM
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"demo_site --check did not finish in 150 s:\n{output}")

    assert proc.returncode == 0, output
    assert "channel layer  InMemoryChannelLayer" in output
    assert re.search(r"2 picks \(\w+, \w+: ", output), output
    assert "1 attention check(s) answered as asked" in output
    assert "completion code: ELIX-TEST-DONE" in output
    assert re.search(r"from the last pick to responses ready: [\d.]+ s", output)
    # The server and the worker were stopped, not left behind.
    pids = re.search(r"server pid (\d+), worker pid (\d+)", output)
    assert pids and not any(process_alive(int(pid)) for pid in pids.groups()), output
    assert "Server and worker stopped (worker exit 0, server exit 0)" in output


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_the_demo_stopped_with_sigterm_leaves_no_process_behind_and_frees_its_port(
    small_elix: Path,
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # `./run demo`'s last step (modeling.demo.start_site) on the demo's folder layout, already trained.
    (tmp_path / "elix").symlink_to(small_elix)
    (tmp_path / "fspo-elix").mkdir()
    for arm in ("fspo", "base"):
        (tmp_path / "fspo-elix" / arm).symlink_to(tiny_checkpoint)
    start = f"from pathlib import Path; from modeling.demo import start_site; raise SystemExit(start_site(Path({str(tmp_path)!r}), check=False, port=0))"
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_KNOBS}
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        demo = subprocess.Popen([sys.executable, "-c", start], cwd=REPO, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 120
        while "Serving until Ctrl-C." not in output.read_text():
            assert demo.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        text = output.read_text()
        pids = re.search(r"server pid (\d+), worker pid (\d+)", text)
        port = re.search(r"participant +http://127\.0\.0\.1:(\d+)/", text)
        assert pids and port, text
        everyone = [
            *_children(demo.pid),
            *(int(pid) for pid in pids.groups()),
        ]  # the site, its server and worker

        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 0, output.read_text()
    finally:
        stop_process(demo)
    assert len(everyone) == 3 and not any(process_alive(pid) for pid in everyone), output.read_text()
    assert "Server and worker stopped" in output.read_text()
    assert _port_free("127.0.0.1", int(port[1]))
