"""The package map of docs/ARCHITECTURE.md, enforced: imports flow one way
(CLI → control plane / producers / consumers → core), nothing in the product imports the dev
tools, the tests or the benchmarks, and the dev tools are not part of the wheel."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Which top-level packages each package may import (besides itself and the standard library).
ALLOWED: dict[str, frozenset[str]] = {
    "schemas": frozenset(),
    "cutover": frozenset({"schemas"}),
    "producers": frozenset({"cutover", "schemas"}),
    "consumers": frozenset({"cutover", "schemas"}),
    "control": frozenset({"cutover", "schemas"}),
    # The web console is the CLI's face: it calls the control plane; only the CLI starts it.
    "console": frozenset({"cutover", "schemas", "control"}),
    "cli": frozenset({"cutover", "schemas", "producers", "consumers", "control", "console"}),
    "devtools": frozenset(
        {"cutover", "schemas", "producers", "consumers", "control", "cli", "console"}
    ),
    "bench": frozenset(
        {"cutover", "schemas", "producers", "consumers", "control", "cli", "console", "devtools"}
    ),
}
OURS = frozenset(ALLOWED) | {"tests"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def _violations() -> list[str]:
    out: list[str] = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for imported in sorted(_imports(path) - allowed - {package}):
                out.append(f"{path.relative_to(REPO)} imports {imported}")
    return out


def test_imports_flow_one_way() -> None:
    assert _violations() == []


@pytest.mark.parametrize("package", ["devtools", "tests", "bench"])
def test_dev_packages_are_not_in_the_wheel(package: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    shipped = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert package not in shipped
    assert set(ALLOWED) - {"devtools", "bench"} == set(shipped)


PRODUCT = ("cutover", "producers", "consumers", "control", "cli", "console", "schemas")
# The targets are ~600 lines per module and ~80 per function; the guard leaves a little slack so
# that a small fix does not force a split, while a module or function that keeps growing does.
MAX_MODULE_LINES = 650
MAX_FUNCTION_LINES = 90


def _sizes() -> tuple[list[str], list[str]]:
    modules: list[str] = []
    functions: list[str] = []
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text()
            name = str(path.relative_to(REPO))
            if text.count("\n") > MAX_MODULE_LINES:
                modules.append(f"{name}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        functions.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return modules, functions


def test_product_modules_and_functions_stay_small() -> None:
    modules, functions = _sizes()
    assert modules == [], "split these modules by concern"
    assert functions == [], "split these functions into steps"
