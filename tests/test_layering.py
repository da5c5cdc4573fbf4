"""modeling/ is plain Python: the web side imports it, never the other way round (DESIGN.md section 3)."""

import ast
import os
import subprocess
import sys
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


def test_it_finds_no_web_imports_in_modeling_source() -> None:
    sources = sorted(MODELING.rglob("*.py"))

    assert sources, "no modeling sources found"
    assert [hit for path in sources for hit in forbidden_imports(path)] == []


def test_it_imports_every_modeling_module_without_loading_django() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}

    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
