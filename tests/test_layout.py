"""Size limits of the code: no module over 600 lines outside bench/ and migrations/, no function over 80
lines outside bench/.

A module or function may cross a limit only while it is listed below with its size, to be shrunk and
never to grow; none is listed. A listed entry whose code shrank below its limit fails too, so the
lists never keep stale entries.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Directories whose modules count (bench/ is exempt from both limits).
CHECKED = ("lpnet", "profiler", "service", "tests", "migrations")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# Migrations are exempt from the module limit only.
MODULE_LIMIT_EXEMPT = ("migrations/",)

# Path -> lines, for modules over MAX_MODULE_LINES.
ALLOWED_MODULES: dict[str, int] = {}

# "path:qualified.name" -> lines from `def` to the function's last line, for functions over MAX_FUNCTION_LINES.
ALLOWED_FUNCTIONS: dict[str, int] = {}


def python_files() -> Iterator[tuple[str, str]]:
    """(path relative to the repository, source) of every Python file that counts."""
    for top in CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


def function_lengths(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """(qualified name, lines) of every function and method in `tree`, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}{node.name}"
            assert node.end_lineno is not None
            yield name, node.end_lineno - node.lineno + 1
            yield from function_lengths(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            yield from function_lengths(node, f"{prefix}{node.name}.")
        else:
            yield from function_lengths(node, prefix)


@cache
def measure() -> tuple[dict[str, int], dict[str, int]]:
    """Lines of every module and of every function, keyed as in the allow-lists (read once per run)."""
    modules: dict[str, int] = {}
    functions: dict[str, int] = {}
    for path, source in python_files():
        modules[path] = len(source.splitlines())
        for name, lines in function_lengths(ast.parse(source, filename=path)):
            functions[f"{path}:{name}"] = lines
    return modules, functions


def over_limit(sizes: dict[str, int], limit: int, allowed: dict[str, int]) -> list[str]:
    """What exceeds `limit` and is not allowed at its size: new offenders, and allowed ones that grew."""
    return [
        f"{key}: {lines} lines (limit {limit}"
        + (f", allowed {allowed[key]})" if key in allowed else ", not in the allow-list)")
        for key, lines in sorted(sizes.items())
        if lines > limit and lines > allowed.get(key, limit)
    ]


def test_function_lengths_count_from_def_to_the_last_line_including_nested_ones() -> None:
    source = "class A:\n    def f(self):\n        def g():\n            return 1\n        return g\n"
    assert dict(function_lengths(ast.parse(source))) == {"A.f": 4, "A.f.g": 2}


def test_over_limit_reports_new_offenders_and_growth_only() -> None:
    sizes = {"new.py": 700, "grown.py": 650, "same.py": 640, "shrunk.py": 610, "small.py": 100}
    allowed = {"grown.py": 640, "same.py": 640, "shrunk.py": 630}
    found = over_limit(sizes, 600, allowed)
    assert found == [
        "grown.py: 650 lines (limit 600, allowed 640)",
        "new.py: 700 lines (limit 600, not in the allow-list)",
    ]


def test_no_module_is_over_the_limit_unless_allowed_at_its_size() -> None:
    modules, _ = measure()
    counted = {path: lines for path, lines in modules.items() if not path.startswith(MODULE_LIMIT_EXEMPT)}
    assert over_limit(counted, MAX_MODULE_LINES, ALLOWED_MODULES) == []


def test_no_function_is_over_the_limit_unless_allowed_at_its_size() -> None:
    _, functions = measure()
    assert over_limit(functions, MAX_FUNCTION_LINES, ALLOWED_FUNCTIONS) == []


def test_the_allow_lists_name_only_what_exists_and_is_still_over_the_limit() -> None:
    modules, functions = measure()
    stale = [path for path in ALLOWED_MODULES if modules.get(path, 0) <= MAX_MODULE_LINES]
    stale += [name for name in ALLOWED_FUNCTIONS if functions.get(name, 0) <= MAX_FUNCTION_LINES]
    assert stale == [], "within the limit now (or gone): remove from the allow-list"
