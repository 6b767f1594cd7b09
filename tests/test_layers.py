"""Imports go one way, down: each package imports only the packages below it, never a script.

    scripts (train.py, test.py, use_model.py, batch_process_patients.py, export_model.py)
    training/                          the epoch loop, validation, the training page
    evaluation/                        metrics, validation scoring, test.py's results
    inference/    options/             volume in -> volume out; flags and the one-line exit
    models/       data/                networks; volumes, slices, datasets (neither knows the other)
    util/                              errors, registries, run folder, device, pictures: imports none of them

Read from the source (every ``import``, function-level ones too), so an arrow up fails here
before a reader has to find it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "util": set(),
    "data": {"util"},
    "models": {"util"},
    "inference": {"data", "models", "util"},
    "options": {"data", "models", "util"},
    "evaluation": {"data", "inference", "util"},
    "training": {"data", "models", "inference", "evaluation", "util"},
}
SCRIPTS = {path.stem for path in REPO.glob("*.py")}


def imported_modules(package: str) -> dict[str, set[str]]:
    """Each top-level name that ``package``'s files import (absolute imports) -> the files that do."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_packages_below_it_and_no_script(package):
    imports = imported_modules(package)
    upward = {name: files for name, files in imports.items() if name in ALLOWED and name != package
              and name not in ALLOWED[package]}  # fmt: skip
    scripts = {name: files for name, files in imports.items() if name in SCRIPTS}
    assert not upward, f"{package}/ imports packages above it: {upward}"
    assert not scripts, f"{package}/ imports scripts: {scripts}"
