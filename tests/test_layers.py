"""The bundle's package is layered: no module imports from a layer above its own (README, Repository layout)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bundle" / "scripts"
# layer of each subpackage; the modules at the package's top level (errors, atomic, distributed, ...) are layer 0
LAYERS = {"networks": 1, "data": 1, "training": 2, "inference": 3}


def _layer(parts: tuple[str, ...]) -> int:
    """Layer of a module given as path parts relative to the package (the last part is the module's file)."""
    return LAYERS.get(parts[0], 0) if len(parts) > 1 else 0


def _imports(package: Path, path: Path) -> list[tuple[str, ...]]:
    """The package modules ``path`` imports (relative and ``scripts.`` imports), as parts relative to the package."""
    here = path.relative_to(package).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)]
            found.append((*base, *(node.module.split(".") if node.module else ()), "_"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("scripts."):
            found.append((*node.module.split(".")[1:], "_"))
    return found


def violations(package: Path) -> list[str]:
    """Imports of a higher layer, or of the other subpackage of the same layer (networks <-> data)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        own = path.relative_to(package).parts
        for target in _imports(package, path):
            sibling = len(own) > 1 and len(target) > 1 and target[0] != own[0] and _layer(target) == _layer(own)
            if _layer(target) > _layer(own) or sibling:
                found.append(f"{'/'.join(own)} imports {'.'.join(target[:-1])}")
    return found


def test_no_module_imports_upwards() -> None:
    assert {path.parent.name for path in PACKAGE.rglob("*.py")} >= set(LAYERS)
    assert violations(PACKAGE) == []


def test_the_check_reports_upward_and_sideways_imports(tmp_path: Path) -> None:
    for folder, source in {
        "training": "from ..inference.strategies import apply_strategy\nfrom ..distributed import unwrap\n",
        "data": "from ..networks.memory import MemoryBank\n",
        "networks": "from .memory import MemoryBank\n",
    }.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "module.py").write_text(source)
    (tmp_path / "drawing.py").write_text("from scripts.training.visuals import TrainingCurves\n")
    assert violations(tmp_path) == [
        "data/module.py imports networks.memory",
        "drawing.py imports training.visuals",
        "training/module.py imports inference.strategies",
    ]
