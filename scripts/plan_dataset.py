"""Propose the target spacing and patch size for a dataset pool and a compute budget, as nnU-Net plans from the data.

Example::

    python scripts/plan_dataset.py --dataset data/brains/dataset.json --budget cpu --output preset.json

It reads the training subjects at their native spacing, measures the median spacing, image extent and structure
extent, and picks the finest spacing at which a patch of the budget (``cpu``: 32 voxels per axis, ``gpu``: 128, or a
number) sees a structure with its neighbours (``scripts/data/planning.py``). ``--output`` writes the two ids as a
config overlay for ``--config_file "['bundle/configs/train.json', ..., 'preset.json']"``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import fire

sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.data.planning import BUDGETS, plan, pool_geometry  # noqa: E402
from scripts.data.pool import DatasetPool  # noqa: E402


def main(dataset: str | list[str], budget: str | int = "cpu", output: str | None = None, num_workers: int = 2) -> None:
    """Print (and with ``output`` write) the plan for the training subjects of ``dataset`` (one or more paths)."""
    edge = BUDGETS[budget] if isinstance(budget, str) else int(budget)
    pool = DatasetPool(
        [dataset] if isinstance(dataset, str) else list(dataset), "training", None, num_workers=num_workers
    )
    geometry = pool_geometry(pool)
    result = plan(geometry, edge)
    report = {
        "median_spacing_mm": geometry.spacing.round(3).tolist(),
        "median_image_extent_mm": geometry.image_extent.round(1).tolist(),
        "median_structure_extent_mm": geometry.structure_extent.round(1).tolist(),
        **asdict(result),
    }
    print(json.dumps(report, indent=4))
    if output:
        preset = {"target_spacing": result.target_spacing, "patch_size": result.patch_size}
        Path(output).write_text(json.dumps(preset, indent=4) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
