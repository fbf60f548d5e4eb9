"""``pyproject.toml`` declares exactly the third-party packages the code imports."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"compare", "jaxside", "numpyside", "tests"}


def imported_top_level(folders) -> set[str]:
    names = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - FIRST_PARTY - set(sys.stdlib_module_names) - {"__future__"}


def declared() -> dict[str, set[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = lambda specs: {re.split(r"[<>=!~\[ ;]", spec)[0].lower() for spec in specs}  # noqa: E731
    return {
        "main": names(project["dependencies"]),
        **{k: names(v) for k, v in project["optional-dependencies"].items()},
    }


def test_declared_dependencies_are_the_imported_ones():
    deps = declared()
    package_imports = imported_top_level(["compare", "jaxside", "numpyside"])
    optional = {"torch"}  # imported only when installed (the bench's outside reference, compare/bench/)
    pins = {"ml_dtypes"}  # JAX's dependency, held below the version that loads slowly (pyproject.toml)
    assert package_imports - optional == deps["main"] - pins
    assert not pins & package_imports, "a pinned transitive dependency is now imported: declare it as a dependency"
    assert optional <= deps["torch"]
    test_only = imported_top_level(["tests"]) - package_imports
    assert test_only == deps["test"] - {"ruff", "import-linter"}  # tools the CI runs, never imported
