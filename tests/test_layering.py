"""Imports only go down: protocols -> psi -> vfl; vfl.models imports only torch."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"protocols": {"psi", "vfl"}, "psi": {"vfl"}, "vfl": set()}


def imported_roots(path: Path) -> set[str]:
    """Top-level package names imported by a file (absolute imports; relative count as own)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_upward_imports() -> None:
    violations = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = imported_roots(path) & forbidden
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_models_import_only_torch() -> None:
    """Plain torch models: besides the standard library they import torch and nothing else."""
    for path in sorted((ROOT / "vfl" / "models").rglob("*.py")):
        roots = imported_roots(path) - set(sys.stdlib_module_names)
        allowed = {"torch", "__future__", "vfl"}
        assert roots <= allowed, f"{path.relative_to(ROOT)} imports {sorted(roots - allowed)}"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vfl"):
                assert node.module.startswith("vfl.models"), f"{path.name} imports {node.module}"


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("import os\nfrom vfl.config import load_config\nimport psi.canon as c\n")
    assert imported_roots(bad) & FORBIDDEN["protocols"] == {"vfl", "psi"}
    assert "os" in sys.stdlib_module_names


def imported_modules(path: Path) -> set[str]:
    """Full names of the modules a file imports (absolute imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODES = {"splitnn": {"scoring"}, "scoring": {"splitnn"}, "fedavg": set(), "transfer": set()}
ABOVE_MODES = ("vfl.simulate", "vfl.datasets")


def test_modes_the_common_layer_and_the_public_api_keep_their_places() -> None:
    """vfl.common imports no mode, no service and no public API; a mode imports no other
    mode (split NN scoring is split NN's) and no public API; the public API (vfl.simulate,
    vfl.datasets) imports no service."""
    vfl_dir = ROOT / "vfl"

    def offending(folder: Path, banned: set[str]) -> list[str]:
        out = []
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else [folder]:
            bad = {
                m
                for m in imported_modules(path)
                if any(m == b or m.startswith(b + ".") for b in banned)
            }
            if bad:
                out.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
        return out

    modes = {f"vfl.{m}" for m in MODES}
    violations = offending(vfl_dir / "common", modes | {"vfl.service", *ABOVE_MODES})
    for mode, allowed in MODES.items():
        banned = {f"vfl.{m}" for m in MODES if m != mode and m not in allowed}
        violations += offending(vfl_dir / mode, banned | set(ABOVE_MODES))
    violations += offending(vfl_dir / "simulate", {"vfl.service", "vfl.api", "vfl.client"})
    violations += offending(vfl_dir / "datasets.py", {"vfl.service", "vfl.api", "vfl.client"})
    assert not violations, "\n".join(violations)
