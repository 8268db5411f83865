"""Packaging: each package's third-party imports are covered by the install that ships it.

`lpnet` (the library) must work from the core install, `profiler` from `lpnet[agent]`, `service` from
`lpnet[server]`. An import counts as covered when its distribution is declared there, or is a
dependency (at any depth) of one that is.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = {"lpnet", "profiler", "service", "migrations"}
INSTALLS = {"lpnet": [], "profiler": ["agent"], "service": ["agent", "server"]}


def _name(requirement: str) -> str:
    """The distribution a requirement names, normalised ("psycopg[binary]>=3.1" -> "psycopg")."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def declared(extras: list[str]) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [_name(r) for r in project["dependencies"]]
    for extra in extras:
        names += [_name(r) for r in project["optional-dependencies"][extra]]
    return {n for n in names if n != "lpnet"}


def with_dependencies(names: set[str]) -> set[str]:
    """`names` and every distribution they require, at any depth (markers and extras ignored)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires]
    return seen


def imported_modules(package: str) -> dict[str, str]:
    """Top-level modules imported by the package's source, each with one file that imports it."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN and top != "__future__":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", sorted(INSTALLS))
def test_every_import_is_covered_by_the_packages_install(package: str) -> None:
    covered = with_dependencies(declared(INSTALLS[package]))
    distributions = metadata.packages_distributions()
    missing = {
        module: where
        for module, where in imported_modules(package).items()
        if not any(_name(d) in covered for d in distributions.get(module, [module]))
    }
    assert not missing, f"{package} imports modules its install does not declare: {missing}"


def test_the_library_install_leaves_the_server_out() -> None:
    core = declared([])
    assert not core & {"fastapi", "sqlalchemy", "alembic", "psycopg", "uvicorn", "onnxruntime"}
    assert declared(["agent"]) < declared(["agent", "server"])
