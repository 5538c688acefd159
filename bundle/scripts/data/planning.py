"""A preprocessing plan from the data, as nnU-Net makes one: the spacing and patch that let a network of a given
budget see a structure together with its neighbours, and a warning at the start of training when a patch cannot.

An in-context model finds a structure by its look and by where it lies among its neighbours; real anatomy (brain
parcels, organs of one tissue) often has nothing else. A patch narrower than a structure and its neighbours leaves
only the look: a 32³ patch at 1 mm sees 32 mm of a brain whose regions span 20-30 mm.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..distributed import is_main_process
from .pool import DatasetPool

logger = logging.getLogger(__name__)

CONTEXT = 2.0  # a patch should span this many typical structure extents per axis: the structure and its neighbours
SMALLEST_VOXELS = 4  # fewest voxels across the smallest structure that a coarser spacing may leave
BUDGETS = {"cpu": 32, "gpu": 128}  # patch edge (voxels) of the bundle's CPU demo and paper recipes


@dataclass
class PoolGeometry:
    """Median voxel spacing, image extent and structure extent of a pool, in mm per axis (D, H, W after RAS).

    ``structure_extent`` is the median over classes of each class's median bounding-box extent over the subjects
    that hold it; ``smallest_structure`` the smallest such class extent (its smallest axis).
    """

    spacing: np.ndarray
    image_extent: np.ndarray
    structure_extent: np.ndarray
    smallest_structure: float
    single_slice: bool = False


def pool_geometry(pool: DatasetPool) -> PoolGeometry:
    """The geometry of a preprocessed pool (at its target spacing, or native), from each subject's spacing, shape and
    foreground samples: no volume is read again."""
    spacings, extents, by_class = [], [], {}
    for subject in pool.subjects:
        spacing = np.asarray(subject.spacing, dtype=float)
        spacings.append(spacing)
        extents.append(np.asarray(subject.shape) * spacing)
        for value, coords in subject.foreground.items():
            span = (coords.max(0) - coords.min(0) + 1) * spacing
            by_class.setdefault((subject.dataset, value), []).append(span)
    class_extents = np.array([np.median(spans, axis=0) for spans in by_class.values()])
    return PoolGeometry(
        spacing=np.median(spacings, axis=0),
        image_extent=np.median(extents, axis=0),
        structure_extent=np.median(class_extents, axis=0),
        smallest_structure=float(class_extents.min()),
        single_slice=all(subject.is_single_slice for subject in pool.subjects),
    )


def field_of_view_problem(geometry: PoolGeometry, patch_size: Sequence[int], spacing: Sequence[float]) -> str | None:
    """Why a patch of ``patch_size`` voxels at ``spacing`` mm sees too little of the pool's anatomy, or None."""
    if geometry.single_slice:
        return None
    view = np.asarray(patch_size, dtype=float) * np.asarray(spacing, dtype=float)
    needed = np.minimum(CONTEXT * geometry.structure_extent, geometry.image_extent)
    if (view >= needed - 1e-6).all():
        return None
    return (
        f"a {'x'.join(str(int(p)) for p in patch_size)} patch at {_mm(spacing)} mm sees {_mm(view)} mm, but the "
        f"typical structure of the pool spans {_mm(geometry.structure_extent)} mm: it sees less than a structure and "
        f"its neighbours ({_mm(needed)} mm). Choose a coarser target_spacing or a larger patch_size "
        "(python scripts/plan_dataset.py --dataset ... proposes both)."
    )


def check_field_of_view(pool: DatasetPool, patch_size: Sequence[int]) -> str | None:
    """Log (on the main process), once at the start of training, when the patch sees less than a structure and its
    neighbours; returns the warning (None when the patch is wide enough)."""
    geometry = pool_geometry(pool)
    problem = field_of_view_problem(geometry, patch_size, geometry.spacing)
    if problem and is_main_process():
        logger.warning(f"Field of view: {problem}")
    return problem


@dataclass
class Plan:
    """Target spacing and patch for a budget, what the patch sees, and what the plan could not satisfy."""

    target_spacing: list[float]
    patch_size: list[int]
    field_of_view_mm: list[float]
    warnings: list[str] = field(default_factory=list)


def plan(geometry: PoolGeometry, patch_edge: int, divisor: int = 16) -> Plan:
    """The finest isotropic spacing (not finer than the data's) at which a patch of at most ``patch_edge`` voxels per
    axis sees ``CONTEXT`` structure extents (or the whole image, if smaller), and that patch, a multiple of
    ``divisor`` voxels per axis (the network's total downsampling) that does not exceed the image.

    Args:
        geometry: the pool's geometry at native spacing (:func:`pool_geometry` of a pool without resampling).
        patch_edge: the compute budget, as voxels per patch axis (``BUDGETS``: 32 on a CPU, 128 on a GPU).
        divisor: patch sizes are multiples of it.
    """
    needed = np.minimum(CONTEXT * geometry.structure_extent, geometry.image_extent)
    finest = float(geometry.spacing.min())
    spacing = max(finest, float((needed / patch_edge).max()))
    spacing = math.ceil(spacing * 20 - 1e-9) / 20  # to 0.05 mm
    image_voxels = geometry.image_extent / spacing
    patch = [int(min(patch_edge, max(divisor, math.ceil(n / divisor) * divisor))) for n in image_voxels]
    result = Plan([spacing] * 3, patch, [round(p * spacing, 1) for p in patch])
    problem = field_of_view_problem(geometry, patch, result.target_spacing)
    if problem:
        result.warnings.append(problem)
    if geometry.smallest_structure / spacing < SMALLEST_VOXELS:
        result.warnings.append(
            f"at {spacing} mm the smallest structure ({geometry.smallest_structure:.1f} mm) spans fewer than "
            f"{SMALLEST_VOXELS} voxels: a larger budget (patch) would keep it"
        )
    return result


def _mm(values: Sequence[float]) -> str:
    return "x".join(f"{float(v):.3g}" for v in values)
