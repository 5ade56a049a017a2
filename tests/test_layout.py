"""The package's shape: each sub-package imports only what its README allows (ham_export/README.md), and every
sub-package has its README."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ham_export"
ALLOWED = {  # sub-package -> the parts of ham_export it may import (errors is allowed everywhere)
    "core": {"core", "ops"},
    "ops": {"ops", "kernels"},
    "kernels": {"kernels", "ops"},
    "backends": {"backends", "core", "ops", "plugins_trt"},
    "plugins_trt": {"plugins_trt", "ops", "kernels"},
    "check": {"check", "backends", "core", "ops"},
    "memory": {"memory", "backends", "core"},
    "train": {"train", "core"},
}


def parts_imported(path: Path, package: str) -> set[str]:
    """The ham_export sub-packages a module imports (absolute or relative, at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("ham_export"):
                name = node.module.split(".")
            elif node.level == 1:
                name = ["ham_export", package, *(node.module or "").split(".")]
            elif node.level == 2:
                name = ["ham_export", *(node.module or "").split(".")] if node.module else \
                    ["ham_export", *(a.name for a in node.names[:1])]
            else:
                continue
            found.add(name[1] if len(name) > 1 and name[1] else node.names[0].name)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ham_export."))
    return found - {"errors", ""}


TOP_LEVEL = {"kernels": ROOT / "kernels", "plugins_trt": ROOT / "plugins_trt"}  # installed as ham_export.<name>
MODULES = [(package, path) for package in ALLOWED
           for path in sorted(TOP_LEVEL.get(package, PACKAGE / package).glob("*.py"))]


@pytest.mark.parametrize(("package", "path"), MODULES, ids=[str(p.relative_to(ROOT)) for _, p in MODULES])
def test_imports_follow_the_architecture(package, path):
    imported = parts_imported(path, package)
    assert imported <= ALLOWED[package], f"{path.relative_to(ROOT)} imports {sorted(imported - ALLOWED[package])}"


@pytest.mark.parametrize("package", sorted(set(ALLOWED) - {"kernels"}))
def test_every_sub_package_has_a_readme(package):
    folder = TOP_LEVEL.get(package, PACKAGE / package)
    readme = folder / "README.md"
    assert readme.is_file() and len(readme.read_text()) > 200
    for module in folder.glob("*.py"):
        if module.name != "__init__.py":
            assert f"`{module.name}`" in readme.read_text(), f"{readme} does not say what {module.name} holds"
