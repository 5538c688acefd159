"""The bundle's package is layered: no module imports from a layer above its own, and no config builds an object of a
layer above its own (README, Repository layout)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
PACKAGE = BUNDLE / "scripts"
# layer of each subpackage; the modules at the package's top level (errors, atomic, distributed, ...) are layer 0
LAYERS = {"networks": 1, "data": 1, "segmentation": 2, "training": 3, "inference": 3}
# the layer each config works in: training's configs build training objects, inference's and evaluation's do not
CONFIG_LAYERS = {"train.json": "training", "inference.json": "inference", "evaluate.json": "inference"}
SCRIPTS_PATH = re.compile(r"\bscripts((?:\.\w+)+)")


def _layer(parts: tuple[str, ...]) -> int:
    """Layer of a module given as path parts relative to the package (the last part is the module's file)."""
    return LAYERS.get(parts[0], 0) if len(parts) > 1 else 0


def _imports(package: Path, path: Path) -> list[tuple[str, ...]]:
    """The package modules ``path`` imports (relative, ``from scripts.`` and ``import scripts.`` imports), as parts
    relative to the package."""
    here = path.relative_to(package).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)]
            found.append((*base, *(node.module.split(".") if node.module else ()), "_"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("scripts."):
            found.append((*node.module.split(".")[1:], "_"))
        elif isinstance(node, ast.Import):
            found += [(*alias.name.split(".")[1:], "_") for alias in node.names if alias.name.startswith("scripts.")]
    return found


def _crosses(own: tuple[str, ...], target: tuple[str, ...]) -> bool:
    """Whether ``own`` may not use ``target``: a higher layer, or the other subpackage of the same layer."""
    sibling = len(own) > 1 and len(target) > 1 and target[0] != own[0] and _layer(target) == _layer(own)
    return _layer(target) > _layer(own) or sibling


def violations(package: Path) -> list[str]:
    """Imports of a higher layer, or of the other subpackage of the same layer (networks <-> data)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        own = path.relative_to(package).parts
        found += [f"{'/'.join(own)} imports {'.'.join(t[:-1])}" for t in _imports(package, path) if _crosses(own, t)]
    return found


def config_violations(configs: Path) -> list[str]:
    """``scripts.`` paths (``_target_`` or expressions) a config uses from a layer above its own or a sibling's."""
    found = []
    for name, subpackage in CONFIG_LAYERS.items():
        for match in SCRIPTS_PATH.finditer((configs / name).read_text()):
            target = tuple(match.group(1).split(".")[1:])
            if _crosses((subpackage, "config"), target):
                found.append(f"{name} uses scripts{match.group(1)}")
    return found


def test_no_module_imports_upwards() -> None:
    assert {path.parent.name for path in PACKAGE.rglob("*.py")} >= set(LAYERS)
    assert violations(PACKAGE) == []


def test_no_config_builds_objects_of_a_layer_above_its_own() -> None:
    for name in CONFIG_LAYERS:
        json.loads((BUNDLE / "configs" / name).read_text())  # the configs exist and parse
    assert config_violations(BUNDLE / "configs") == []


def test_the_check_reports_upward_and_sideways_imports(tmp_path: Path) -> None:
    for folder, source in {
        "training": "from ..inference.strategies import apply_strategy\nfrom ..distributed import unwrap\n",
        "data": "from ..networks.memory import MemoryBank\nimport scripts.segmentation.metrics\n",
        "networks": "from .memory import MemoryBank\n",
        "segmentation": "import scripts.data.pool\nimport scripts.training.engines as engines\n",
    }.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "module.py").write_text(source)
    (tmp_path / "drawing.py").write_text("from scripts.training.visuals import TrainingCurves\n")
    assert violations(tmp_path) == [
        "data/module.py imports networks.memory",
        "data/module.py imports segmentation.metrics",
        "drawing.py imports training.visuals",
        "segmentation/module.py imports training.engines",
        "training/module.py imports inference.strategies",
    ]


def test_the_check_reports_configs_that_build_objects_of_a_higher_layer(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text('{"a": {"_target_": "scripts.inference.strategies.strategy_inferer"}}')
    (tmp_path / "inference.json").write_text(
        '{"a": "$scripts.training.engines.EpisodicTrainer", "b": "scripts.errors"}'
    )
    (tmp_path / "evaluate.json").write_text('{"a": {"_target_": "scripts.segmentation.metrics.ClassGroupDice"}}')
    assert config_violations(tmp_path) == [
        "train.json uses scripts.inference.strategies.strategy_inferer",
        "inference.json uses scripts.training.engines.EpisodicTrainer",
    ]
