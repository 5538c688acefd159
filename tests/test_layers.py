"""The bundle's package is layered: no module imports from a layer above its own, and no config builds an object of a
layer above its own (README, Repository layout)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from monai.bundle import ConfigParser

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
PACKAGE = BUNDLE / "scripts"
# layer of each subpackage; the modules at the package's top level (errors, atomic, distributed, ...) are layer 0
LAYERS = {"networks": 1, "data": 1, "segmentation": 2, "training": 3, "inference": 3}
# the layer each config works in: training's configs build training objects, inference's and evaluation's do not
CONFIG_LAYERS = {"train.json": "training", "inference.json": "inference", "evaluate.json": "inference"}
# configs run on top of another (evaluation reads the training config's pools and network); the others run alone
CONFIG_STACKS = {"evaluate.json": ["train.json", "evaluate.json"]}
SCRIPTS_PATH = re.compile(r"\bscripts((?:\.\w+)+)")
REFERENCE = re.compile(r"[@%]([\w#]+)")


def _layer(parts: tuple[str, ...]) -> int:
    """Layer of a module given as path parts relative to the package (the last part is the module's file)."""
    return LAYERS.get(parts[0], 0) if len(parts) > 1 else 0


def _imports(package: Path, path: Path) -> list[tuple[str, ...]]:
    """What ``path`` imports from the package (relative imports, ``from scripts... import`` and ``import scripts...``),
    each as the path of the imported name relative to the package, e.g. ``("segmentation", "metrics", "dice")``."""
    here = path.relative_to(package).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module.split(".") if node.module else []
            if node.level:
                module = [*here[: len(here) - (node.level - 1)], *module]
            elif module and module[0] == "scripts":
                module = module[1:]
            else:
                continue
            found += [(*module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [tuple(alias.name.split(".")[1:]) for alias in node.names if alias.name.startswith("scripts.")]
    return found


def _crosses(own: tuple[str, ...], target: tuple[str, ...]) -> bool:
    """Whether module ``own`` (its path) may not use ``target`` (the path of a name): a higher layer, or the other
    subpackage of the same layer."""
    layer = LAYERS.get(target[0], 0)
    sibling = len(own) > 1 and target[0] in LAYERS and target[0] != own[0] and layer == _layer(own)
    return layer > _layer(own) or sibling


def violations(package: Path) -> list[str]:
    """Imports of a higher layer, or of the other subpackage of the same layer (networks <-> data)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        own = path.relative_to(package).parts
        found += [f"{'/'.join(own)} imports {'.'.join(t)}" for t in _imports(package, path) if _crosses(own, t)]
    return found


def _used_items(configs: Path, name: str) -> list[str]:
    """The JSON text of every item that config ``name`` defines and of every item those refer to (``@id``, ``%id``),
    in the files it runs with: what running it may build."""
    parser = ConfigParser()
    parser.read_config([str(configs / part) for part in CONFIG_STACKS.get(name, [name])])
    pending, seen, texts = list(json.loads((configs / name).read_text())), set(), []
    while pending:
        item = pending.pop()
        if item in seen or item not in parser:
            continue
        seen.add(item)
        texts.append(json.dumps(parser[item]))
        pending += REFERENCE.findall(texts[-1])
    return texts


def config_violations(configs: Path) -> list[str]:
    """``scripts.`` paths (``_target_`` or expressions) that running a config uses from a layer above its own or a
    sibling's, its own items and those they refer to in the files it runs with."""
    found = set()
    for name, subpackage in CONFIG_LAYERS.items():
        for text in _used_items(configs, name):
            for match in SCRIPTS_PATH.finditer(text):
                if _crosses((subpackage, "config"), tuple(match.group(1).split(".")[1:])):
                    found.add(f"{name} uses scripts{match.group(1)}")
    return sorted(found)


def test_no_module_imports_upwards() -> None:
    assert {path.parent.name for path in PACKAGE.rglob("*.py")} >= set(LAYERS)
    assert violations(PACKAGE) == []


def test_no_config_builds_objects_of_a_layer_above_its_own() -> None:
    for name in CONFIG_LAYERS:
        json.loads((BUNDLE / "configs" / name).read_text())  # the configs exist and parse
    assert config_violations(BUNDLE / "configs") == []


def test_the_check_reports_upward_and_sideways_imports(tmp_path: Path) -> None:
    for folder, source in {
        "training": "from ..inference.strategies import apply_strategy\nfrom ..distributed import unwrap\n"
        "from .. import inference, errors\n",
        "data": "from ..networks.memory import MemoryBank\nimport scripts.segmentation.metrics\n"
        "from scripts import training\n",
        "networks": "from .memory import MemoryBank\n",
        "segmentation": "import scripts.data.pool\nimport scripts.training.engines as engines\n",
    }.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "module.py").write_text(source)
    (tmp_path / "drawing.py").write_text("from scripts.training.visuals import TrainingCurves\n")
    assert violations(tmp_path) == [
        "data/module.py imports networks.memory.MemoryBank",
        "data/module.py imports segmentation.metrics",
        "data/module.py imports training",
        "drawing.py imports training.visuals.TrainingCurves",
        "segmentation/module.py imports training.engines",
        "training/module.py imports inference.strategies.apply_strategy",
        "training/module.py imports inference",
    ]


def test_the_check_reports_configs_that_build_objects_of_a_higher_layer(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(
        '{"a": {"_target_": "scripts.inference.strategies.strategy_inferer"}, '
        '"b": {"_target_": "scripts.training.moved_ids.refuse_moved_ids"}, "c": {"d": "$@b"}}'
    )
    (tmp_path / "inference.json").write_text(
        '{"a": "$scripts.training.engines.EpisodicTrainer", "b": "scripts.errors"}'
    )
    (tmp_path / "evaluate.json").write_text(
        '{"e": {"_target_": "scripts.segmentation.metrics.ClassGroupDice"}, "evaluating": ["@c#d"]}'
    )
    assert config_violations(tmp_path) == [
        "evaluate.json uses scripts.training.moved_ids.refuse_moved_ids",
        "inference.json uses scripts.training.engines.EpisodicTrainer",
        "train.json uses scripts.inference.strategies.strategy_inferer",
    ]
