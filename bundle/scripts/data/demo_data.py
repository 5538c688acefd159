"""Deterministic synthetic CT-like data set, so the bundle can be trained and tested without downloading anything.

It is built to give an in-context model what real anatomy gives it, and to deny trivial rules what they would need:

- **an atlas with per-subject variation**: every structure class has a home position in the field of view (a crop
  inside a CT-like body, with the spine behind), moved per subject by up to 6 voxels per axis and by a rotation of
  the whole layout, with its own size, proportions and (limited) orientation;
- **intensity families that overlap**: four families (fluid, soft, enhancing, dense) hold three classes each, so an
  intensity range never singles out one class; classes of a family differ by **texture** (smooth, rim, mottled,
  striped, speckled, holes) and shape, which a reference shows and a threshold does not;
- **crowding**: the classes of a family are neighbours, as organs of similar density are, so a training patch holds
  several structures and often one that only its texture tells apart;
- **held-out classes that are new structures**: each one combines a family and a texture that no training class has
  (fluid + striped, enhancing + rim, dense + mottled); they appear in training volumes only unlabelled.

The trivial rules of :mod:`scripts.segmentation.controls` score low on it (measured in docs/results.md).

Everything is drawn from seeded ``numpy`` generators: the same seed writes the same bytes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

REFERENCE_SIZE = 64  # sizes and distances below are in voxels of a 64^3 volume and scale with the volume
AIR_HU = -1000.0
FAT_HU = -100.0
TISSUE_HU = 35.0  # the soft-tissue background that every structure sits in
PRESENCE = 0.85  # probability that a subject has a given structure, so some references have nothing to find
JITTER = 6.0  # per-axis displacement (voxels) of a structure from its home position, uniform in +-JITTER
LAYOUT_DEGREES = 15.0  # per-subject rotation of the whole layout about the body axis
MARGIN = 1  # voxels kept free between two structures

# A shape maps local coordinates (3 x n x n x n, voxels, rotated), a generator and a size scale to a boolean mask.
Shape = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]
# A texture maps local coordinates, the structure's mask and a generator to an HU offset per voxel of the grid.
Texture = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _norm(coords: np.ndarray) -> np.ndarray:
    return np.sqrt((coords**2).sum(0))


def _ellipsoid(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    axes = s * rng.uniform(0.85, 1.15) * np.array([7.5, 6.0, 5.0]) * rng.uniform(0.85, 1.15, size=3)
    return ((c / axes[:, None, None, None]) ** 2).sum(0) <= 1.0


def _round(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    axes = s * rng.uniform(5.0, 6.5) * rng.uniform(0.9, 1.1, size=3)
    return ((c / axes[:, None, None, None]) ** 2).sum(0) <= 1.0


def _large(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    axes = s * rng.uniform(0.9, 1.1) * np.array([9.5, 7.0, 6.5]) * rng.uniform(0.9, 1.1, size=3)
    return ((c / axes[:, None, None, None]) ** 2).sum(0) <= 1.0


def _lobed(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    count = rng.integers(3, 5)
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = s * rng.uniform(4.0, 5.5, size=count)
    centres = directions * (radii * rng.uniform(0.5, 0.8, size=count))[:, None]
    offsets = c[None] - centres[:, :, None, None, None]
    return (np.sqrt((offsets**2).sum(1)) <= radii[:, None, None, None]).any(0)


def _tube(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    half_length, radius = s * rng.uniform(8.0, 10.0), s * rng.uniform(3.0, 3.8)
    bend = s * rng.uniform(1.0, 2.5) * np.sin(np.pi * np.clip(c[0] / half_length, -1, 1) / 2 + rng.uniform(0, np.pi))
    return (np.abs(c[0]) <= half_length) & (np.hypot(c[1] - bend, c[2]) <= radius)


def _plate(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    axes = s * np.array([rng.uniform(8.0, 10.0), rng.uniform(6.5, 8.0), rng.uniform(2.8, 3.4)])
    return ((c / axes[:, None, None, None]) ** 2).sum(0) <= 1.0


def _smooth(c: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.zeros(mask.shape)


def _rim(c: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An enhancing wall about 2.5 voxels thick around a darker core."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    return np.where(depth <= 2.5, 130.0, -20.0)


def _mottled(c: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blotchy intensity variation of a few voxels' scale."""
    field = ndimage.gaussian_filter(rng.standard_normal(mask.shape), 1.8)
    return 80.0 * field / field.std()


def _striped(c: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Parallel lamellae about 6 voxels apart along a random direction."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    phase = np.einsum("i,i...->...", direction, c) * 2 * np.pi / rng.uniform(5.5, 6.5) + rng.uniform(0, 2 * np.pi)
    return 90.0 * np.sign(np.sin(phase))


def _speckled(c: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small bright calcification-like dots."""
    dots = ndimage.binary_dilation(rng.random(mask.shape) < 0.04)
    return np.where(dots, 220.0, -15.0)


def _holes(c: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Three or four dark cyst-like holes of 2-3 voxels radius inside the structure."""
    inside = np.argwhere(ndimage.binary_erosion(mask, iterations=2))
    offset = np.zeros(mask.shape)
    if len(inside) == 0:
        return offset
    grid = np.indices(mask.shape)
    for centre in inside[rng.integers(0, len(inside), size=rng.integers(3, 5))]:
        hole = _norm(grid - centre[:, None, None, None]) <= rng.uniform(2.0, 3.0)
        offset[hole] = -120.0
    return offset


@dataclass(frozen=True)
class StructureClass:
    """One structure class: where it lives, its shape, its intensity family and its texture."""

    name: str
    home: tuple[float, float, float]  # centre in normalised coordinates of the field of view (x, y, z)
    shape: Shape
    family: str
    texture: Texture

    @property
    def hu(self) -> float:
        """The family's base intensity; the texture adds to it."""
        return FAMILY_HU[self.family]


FAMILY_HU = {"fluid": -20.0, "soft": 70.0, "enhancing": 160.0, "dense": 260.0}
STRUCTURES: tuple[StructureClass, ...] = (  # each family's classes are neighbours, as organs of similar density are
    StructureClass("fluid_round", (-0.42, 0.35, -0.5), _round, "fluid", _smooth),
    StructureClass("fluid_rim", (-0.42, 0.35, 0.0), _ellipsoid, "fluid", _rim),
    StructureClass("fluid_striped", (-0.42, 0.35, 0.5), _ellipsoid, "fluid", _striped),
    StructureClass("soft_lobed", (0.42, 0.35, 0.5), _lobed, "soft", _smooth),
    StructureClass("soft_mottled", (0.42, 0.35, 0.0), _large, "soft", _mottled),
    StructureClass("soft_holes", (0.42, 0.35, -0.5), _ellipsoid, "soft", _holes),
    StructureClass("enhancing_tube", (-0.4, -0.35, -0.5), _tube, "enhancing", _smooth),
    StructureClass("enhancing_striped", (-0.4, -0.35, 0.0), _ellipsoid, "enhancing", _striped),
    StructureClass("enhancing_rim", (-0.4, -0.35, 0.5), _round, "enhancing", _rim),
    StructureClass("dense_plate", (0.4, -0.35, 0.5), _plate, "dense", _smooth),
    StructureClass("dense_speckled", (0.4, -0.35, 0.0), _ellipsoid, "dense", _speckled),
    StructureClass("dense_mottled", (0.4, -0.35, -0.5), _ellipsoid, "dense", _mottled),
)
CLASS_NAMES: tuple[str, ...] = tuple(structure.name for structure in STRUCTURES)
# a family and a texture that no training class combines: new structures, never a positive in training
HELD_OUT_LABELS: tuple[str, ...] = ("fluid_striped", "enhancing_rim", "dense_mottled")
DATASET_NAME = "IrisDemo"


def model_channels() -> tuple[dict[str, str], dict[str, str]]:
    """The demo model's outputs as ``metadata.json`` describes them (its ``channel_def``s): the memory bank's classes
    (the query-only forward's channels, sorted by name) and the label values of the label map. The class lists of
    the bundle have this one source; a test keeps ``metadata.json`` equal to it."""
    seen = [(value, name) for value, name in enumerate(CLASS_NAMES, start=1) if name not in HELD_OUT_LABELS]
    bank = sorted(f"{DATASET_NAME}/{name}" for _, name in seen)
    labels = {"0": "background", **{str(value): f"{DATASET_NAME}/{name}" for value, name in seen}}
    return {str(index): name for index, name in enumerate(bank)}, labels


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A rotation about a random axis by at most ``max_degrees``: orientation varies, as organs' do, within limits."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _draw(structure: StructureClass, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Paint one instance on a local grid: its mask and its HU offsets (texture), cropped to the bounding box."""
    half = int(np.ceil(11 * scale)) + 2
    grid = np.indices((2 * half + 1,) * 3, dtype=float) - half
    local = np.einsum("ij,j...->i...", _rotation(rng, 30.0).T, grid)
    mask = structure.shape(local, rng, scale)
    texture = structure.texture(local, mask, rng)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(np.argwhere(mask).min(0), np.argwhere(mask).max(0)))
    return mask[box], texture[box]


def _place(
    mask: np.ndarray, home: np.ndarray, jitter: float, rng: np.random.Generator, allowed: np.ndarray, taken: np.ndarray
) -> tuple[slice, ...] | None:
    """A region for ``mask`` near ``home`` inside ``allowed`` that keeps ``MARGIN`` voxels from ``taken``, or None.

    The displacement shrinks with every failed attempt, so crowded subjects still hold their structures near home.
    """
    halo = ndimage.binary_dilation(np.pad(mask, MARGIN), iterations=MARGIN)
    size = np.array(mask.shape)
    for attempt in range(40):
        shrink = 1.0 - attempt / 40
        corner = np.round(home + rng.uniform(-jitter, jitter, size=3) * shrink - size / 2).astype(int)
        if (corner < MARGIN).any() or (corner + size + MARGIN > np.array(allowed.shape)).any():
            continue
        region = tuple(slice(o, o + n) for o, n in zip(corner, size))
        padded = tuple(slice(o - MARGIN, o + n + MARGIN) for o, n in zip(corner, size))
        if allowed[region][mask].all() and not taken[padded][halo].any():
            return region
    return None


def _bias_field(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Smooth multiplicative field (exponential of a random quadratic polynomial), like scanner inhomogeneity."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    terms = [x, y, z, x * y, x * z, y * z, x**2, y**2, z**2]
    return np.exp(sum(coef * term for coef, term in zip(rng.normal(0.0, 0.03, size=len(terms)), terms)))


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / field.std()


def _make_subject(
    rng: np.random.Generator, classes: Sequence[int], shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like volume (HU, int16) and its label map (uint8, ``k + 1`` for class index ``k``)."""
    scale = min(shape[:2]) / REFERENCE_SIZE
    x, y, z = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    centre = np.array(shape, dtype=float) / 2 - 0.5 + rng.uniform(-1.5, 1.5, size=3) * scale
    semi_axes = np.array([rng.uniform(0.62, 0.68) * shape[0], rng.uniform(0.55, 0.6) * shape[1]])
    rho = np.hypot((x - centre[0]) / semi_axes[0], (y - centre[1]) / semi_axes[1])
    body, inside = rho <= 1.0, rho <= 1.0 - 2.0 * max(scale, 0.5) / semi_axes[:2].min()
    spine = np.hypot(x - centre[0], y - centre[1] + 0.8 * shape[1] / 2) <= 4.0 * scale

    image = np.full(shape, AIR_HU)
    image[body] = FAT_HU + 10 * _smooth_noise(rng, shape, 1.5)[body]
    image[inside] = TISSUE_HU + rng.uniform(-8.0, 8.0) + 8 * _smooth_noise(rng, shape, 2.0)[inside]
    image[spine] = rng.uniform(350.0, 550.0) + 30 * _smooth_noise(rng, shape, 1.0)[spine]

    contrast = rng.uniform(0.8, 1.2)  # the contrast phase scales every enhancement of the subject
    turn = np.deg2rad(rng.uniform(-LAYOUT_DEGREES, LAYOUT_DEGREES))
    layout = np.array([[np.cos(turn), -np.sin(turn), 0.0], [np.sin(turn), np.cos(turn), 0.0], [0.0, 0.0, 1.0]])
    label = np.zeros(shape, dtype=np.uint8)
    taken = spine.copy()
    for k in rng.permutation(np.asarray(classes)):
        structure = STRUCTURES[k]
        mask, texture = _draw(structure, rng, scale)
        home = centre + layout @ (np.array(structure.home) * np.array(shape) / 2)
        region = _place(mask, home, JITTER * scale, rng, inside & ~spine, taken)
        if region is None:
            continue
        taken[region] |= mask
        label[region][mask] = k + 1
        base = TISSUE_HU + (structure.hu - TISSUE_HU) * contrast + rng.uniform(-12.0, 12.0)
        image[region][mask] = (base + texture + 5 * rng.standard_normal(mask.shape))[mask]

    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 0.7))  # partial volume
    image = (image - AIR_HU) * _bias_field(rng, shape) + AIR_HU  # the bias scales attenuation, not HU
    image += rng.normal(0.0, rng.uniform(5.0, 8.0), size=shape)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label


def _plan_class_subsets(rng: np.random.Generator, num_subjects: int) -> list[list[int]]:
    """Each subject holds each class with probability ``PRESENCE`` (at least half of the classes)."""
    subsets = []
    for _ in range(num_subjects):
        present = np.flatnonzero(rng.random(len(STRUCTURES)) < PRESENCE)
        while len(present) < len(STRUCTURES) // 2:
            present = np.flatnonzero(rng.random(len(STRUCTURES)) < PRESENCE)
        subsets.append(present.tolist())
    return subsets


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def make_demo_dataset(
    output_dir: str | Path,
    num_training: int = 24,
    num_validation: int = 6,
    shape: tuple[int, int, int] = (64, 64, 48),
    spacing: float = 1.5,
    seed: int = 0,
    num_test: int = 6,
) -> Path:
    """Write ``imagesTr``/``labelsTr`` NIfTI files and an MSD-style ``dataset.json``; return the latter's path.

    Subject ``i`` draws its geometry from ``default_rng([seed, i])``, the class subsets from ``default_rng(seed)``.
    ``num_test`` labelled subjects form a ``test`` split, kept apart from model selection for the final evaluation.
    """
    output_dir = Path(output_dir)
    (output_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (output_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([float(spacing)] * 3 + [1.0])
    num_subjects = num_training + num_validation + num_test
    items = []
    for index, classes in enumerate(_plan_class_subsets(np.random.default_rng(seed), num_subjects)):
        image, label = _make_subject(np.random.default_rng([seed, index]), classes, shape)
        item = {"image": f"imagesTr/demo_{index:03d}.nii.gz", "label": f"labelsTr/demo_{index:03d}.nii.gz"}
        _save(image, affine, output_dir / item["image"])
        _save(label, affine, output_dir / item["label"])
        items.append(item)

    validation_end = num_training + num_validation
    dataset = {
        "name": DATASET_NAME,
        "description": "Synthetic CT-like volumes: twelve structure classes at atlas positions with per-subject "
        "variation, in four intensity families told apart by texture and shape. Deterministic for a given seed.",
        "reference": "synthetic, generated by scripts/make_demo_data.py",
        "licence": "Apache-2.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(k + 1): name for k, name in enumerate(CLASS_NAMES)}},
        "held_out_labels": list(HELD_OUT_LABELS),
        "numTraining": num_training,
        "numValidation": num_validation,
        "numTest": num_test,
        "training": items[:num_training],
        "validation": items[num_training:validation_end],
        "test": items[validation_end:],
    }
    path = output_dir / "dataset.json"
    path.write_text(json.dumps(dataset, indent=4) + "\n")
    return path


def ensure_demo_data(dataset_dir: str | Path) -> str:
    """Return the demo ``dataset.json`` path, generating the default data set first only if it is missing."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.exists():
        logger.info("Generating the synthetic demo data set in %s", dataset_dir)
        make_demo_dataset(dataset_dir)
    return str(path)
