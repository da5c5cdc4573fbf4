"""The floors and who owns what (DESIGN.md section 3), checked on the source text:

- modeling/ is plain Python: the web side imports it, never the other way round;
- annotation/ is rows and reads: from studyapp it imports only the models (and pseudonyms, datastore),
  never the journey (flow, realtime, selectors, services);
- nothing outside worker/ imports worker (the web side enqueues tasks by name, through studyapp.queue);
- a participant's state and generation are written only in studyapp/services/;
- every task studyapp.queue can enqueue is registered in the Celery app and routed to its queue.

Each check takes the tree's root, so it can be pointed at another checkout (an older commit, say).
"""

import ast
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELING = REPO / "modeling"
FORBIDDEN = {"django", "studyapp", "annotation", "worker"}

# Imports every modeling module in a fresh interpreter, then checks that Django never got loaded.
# Skipped: modeling.demo (an entry point, not a library module), __main__ modules (importing one runs
# it), and modules that need an optional extra that is not installed (vllm).
IMPORT_ALL = """
import importlib, pkgutil, sys
import modeling

OPTIONAL_EXTRAS = {"vllm"}
imported, skipped = [], []
for info in pkgutil.walk_packages(modeling.__path__, "modeling."):
    name = info.name
    if name == "modeling.demo" or name.startswith("modeling.demo.") or name.rsplit(".", 1)[-1] == "__main__":
        continue
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in OPTIONAL_EXTRAS:
            raise
        skipped.append(name)
        continue
    imported.append(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"django", "studyapp", "annotation", "worker"})
print(f"imported {len(imported)} modules, skipped {skipped}")
assert imported, "no modeling module was imported"
assert "django" not in sys.modules and not loaded, f"modeling loaded {loaded}"
"""


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, at the top or inside a function; for
    `from a import b` both `a` and `a.b` (b may be a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def forbidden_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [
            f"{path.relative_to(REPO)}:{node.lineno} imports {n}"
            for n in names
            if n.split(".")[0] in FORBIDDEN
        ]
    return found


def sources(root: Path, *folders: str) -> list[Path]:
    """The Python files under `folders` of the tree at `root` (migrations aside: they are generated)."""
    return sorted(
        p for folder in folders for p in (root / folder).rglob("*.py") if "migrations" not in p.parts
    )


# What annotation/ may import from studyapp: the rows it writes and reads, and two helpers without state.
ANNOTATION_MAY_IMPORT = ("studyapp.models", "studyapp.pseudonyms", "studyapp.datastore")


def offending_imports(root: Path, paths: list[Path], offends: Callable[[str], bool]) -> list[str]:
    """`path:line imports name` for each import line of `paths` that imports an offending module (its
    first offending name)."""
    found: dict[tuple[str, int], str] = {}
    for path in paths:
        for line, name in imported_modules(path):
            if offends(name):
                found.setdefault((str(path.relative_to(root)), line), name)
    return [f"{path}:{line} imports {name}" for (path, line), name in sorted(found.items())]


def annotation_imports_of_studyapp(root: Path) -> list[str]:
    def offends(name: str) -> bool:
        # `from studyapp import flow` is seen as studyapp.flow; a bare `studyapp` alone names nothing.
        if name.split(".")[0] != "studyapp" or name == "studyapp":
            return False
        return not any(name == ok or name.startswith(f"{ok}.") for ok in ANNOTATION_MAY_IMPORT)

    return offending_imports(root, sources(root, "annotation"), offends)


def imports_of_worker(root: Path) -> list[str]:
    """Imports of worker from outside worker/ (the tests aside: they test the tasks)."""
    paths = sources(root, "studyapp", "annotation", "modeling", "bench") + [root / "manage.py"]
    return offending_imports(root, paths, lambda name: name.split(".")[0] == "worker")


PARTICIPANT_STATUS_FIELDS = {"state", "generation"}
# Calls that write their keyword arguments into rows (QuerySet.update, create and friends).
ROW_WRITES = {"update", "create", "get_or_create", "update_or_create", "bulk_create"}


def _status_writes_in(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for t in ast.walk(target):  # tuple targets too: `p.state, p.generation = ...`
                    if isinstance(t, ast.Attribute) and t.attr in PARTICIPANT_STATUS_FIELDS:
                        found.append((node.lineno, f"assigns .{t.attr}"))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ROW_WRITES:
                found += [
                    (node.lineno, f"{name}({k.arg}=...)")
                    for k in node.keywords
                    if k.arg in PARTICIPANT_STATUS_FIELDS
                ]
            elif name == "setattr" and len(node.args) >= 2:
                field = node.args[1]
                if isinstance(field, ast.Constant) and field.value in PARTICIPANT_STATUS_FIELDS:
                    found.append((node.lineno, f"setattr(..., {field.value!r})"))
    return found


def participant_status_writes(root: Path) -> list[str]:
    """Writes of a participant's state or generation outside studyapp/services/: an assignment to a
    `.state` or `.generation` attribute, a row write (update, create, ...) with such a keyword, or a
    setattr with such a name. (No other model of the web side has fields of these names.)"""
    services = root / "studyapp" / "services"
    return [
        f"{path.relative_to(root)}:{line} {what}"
        for path in sources(root, "studyapp", "annotation", "worker", "bench")
        if services not in path.parents
        for line, what in sorted(_status_writes_in(ast.parse(path.read_text(), filename=str(path))))
    ]


def test_it_finds_no_web_imports_in_modeling_source() -> None:
    paths = sorted(MODELING.rglob("*.py"))

    assert paths, "no modeling sources found"
    assert [hit for path in paths for hit in forbidden_imports(path)] == []


def test_it_imports_every_modeling_module_without_loading_django() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}

    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_annotation_imports_nothing_of_studyapp_but_its_models_pseudonyms_and_datastore() -> None:
    assert sources(REPO, "annotation"), "no annotation sources found"
    assert annotation_imports_of_studyapp(REPO) == []


def test_nothing_outside_worker_imports_worker() -> None:
    assert imports_of_worker(REPO) == []


def test_a_participants_state_and_generation_are_written_only_in_studyapp_services() -> None:
    assert participant_status_writes(REPO) == []
    # The check sees the writes the services make (it would see them anywhere else).
    services = sources(REPO, "studyapp/services")
    assert {what for p in services for _, what in _status_writes_in(ast.parse(p.read_text()))} >= {
        "assigns .state",
        "assigns .generation",
    }


def test_every_task_the_web_side_enqueues_is_registered_and_routed_to_its_queue() -> None:
    import worker.tasks  # noqa: F401  (registers the tasks, as a worker does at start)
    from studyapp import queue
    from studyapp.celery import app
    from studyapp.services.jobs import JOB_TASKS

    registered = {name for name in app.tasks if name.startswith(f"{queue.TASKS_MODULE}.")}
    routed = {name: app.amqp.router.route({}, name)["queue"].name for name in queue.TASK_QUEUES}

    assert registered == set(queue.TASK_QUEUES)
    assert routed == queue.TASK_QUEUES
    assert set(JOB_TASKS.values()) | {queue.PERSONALIZE} <= set(queue.TASK_QUEUES)
    assert {entry["task"] for entry in app.conf.beat_schedule.values()} <= registered
    assert enqueued_names(REPO) <= set(queue.TASK_QUEUES)


def enqueued_names(root: Path) -> set[str]:
    """The task names passed to `queue.enqueue(queue.NAME, ...)` anywhere in studyapp/ (a name given
    through a variable, as jobs.py does from JOB_TASKS, is checked through that table)."""
    from studyapp import queue

    names = set()
    for path in sources(root, "studyapp"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "enqueue"
                and node.args
                and isinstance(node.args[0], ast.Attribute)
            ):
                names.add(getattr(queue, node.args[0].attr))
    assert names, "no queue.enqueue(queue.NAME, ...) call found"
    return names
