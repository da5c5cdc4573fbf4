"""Functions stay short enough to read in one screen: none runs past MAX_LINES lines of code (its
docstring not counted) unless a comment on its `def` line, or on the line above it (or above its
decorators), says why, starting `# long:`. Complexity has the same rule in `./run lint` (ruff's C901,
max-complexity 15, where the reason goes after `# noqa: C901`)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("modeling", "studyapp", "annotation", "worker", "bench")
MAX_LINES = 60
MARK = "# long:"


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The function's lines from `def` to its last line, less its docstring."""
    span = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        span -= first.end_lineno - first.lineno + 1
    return span


def has_reason(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    top = min([node.lineno] + [d.lineno for d in node.decorator_list])
    candidates = [lines[node.lineno - 1], lines[top - 2] if top >= 2 else ""]
    return any(MARK in line for line in candidates)


def long_functions(path: Path, root: Path = REPO) -> list[str]:
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = code_lines(node)
            if n > MAX_LINES and not has_reason(lines, node):
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} has {n} lines")
    return found


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "migrations" not in p.parts)


def test_it_reads_the_sources_it_checks() -> None:
    names = {p.relative_to(REPO).parts[0] for p in sources()}

    assert names == set(PACKAGES)


def test_no_function_runs_past_the_limit_without_a_reason() -> None:
    assert [hit for path in sources() for hit in long_functions(path)] == []


def test_the_rule_flags_a_long_function_and_accepts_a_reason(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES + 1))
    plain = tmp_path / "plain.py"
    plain.write_text(f'def f():\n    """Doc."""\n{body}\n')
    marked = tmp_path / "marked.py"
    marked.write_text(f"# long: a table of cases read top to bottom\ndef f():\n{body}\n")

    assert [hit.split(" has ")[0] for hit in long_functions(plain, tmp_path)] == ["plain.py:1 f"]
    assert long_functions(marked, tmp_path) == []
