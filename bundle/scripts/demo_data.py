"""Deterministic synthetic CT-like data set, so the bundle can be trained and tested without downloading anything.

Every subject is a soft-tissue "body" in air holding a random subset of geometric structures. The structure classes
share overlapping intensity ranges and differ in shape and topology, so an in-context model has to learn from the
support mask's shape rather than from a fixed intensity. Everything is drawn from seeded ``numpy`` generators.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

# A painter maps rotated local coordinates (3, n, n, n) in voxels, a generator and a size scale to a boolean mask.
Painter = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]

REFERENCE_SIZE = 64  # structure sizes below are in voxels of a 64^3 volume and scale with the volume
MAX_RADIUS = 13.0  # every painter draws inside this ball (before scaling), i.e. diameters up to about 24 voxels
AIR_HU = -1000.0
FAT_HU = -100.0
MARGIN = 2.0  # voxels kept free between two structures (scaled like the sizes, at least one)
MAX_ATTEMPTS = 64
POSITIONS_PER_SHAPE = 8


def _thickness(value: float, scale: float) -> float:
    """Scale a half-thickness but keep thin parts at least a voxel thick, so small volumes still rasterise them."""
    return max(1.0, value * scale)


def _norm(coords: np.ndarray) -> np.ndarray:
    return np.sqrt((coords**2).sum(0))


def _segment_distance(coords: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Distance of every grid point to the nearest of the segments ``starts[k] -> ends[k]`` (tubes are iso-surfaces)."""
    points = coords.reshape(3, -1)
    squared = np.full(points.shape[1], np.inf)
    for start, end in zip(starts, ends):
        direction = end - start
        offset = points - start[:, None]
        t = np.clip(direction @ offset / max(direction @ direction, 1e-12), 0.0, 1.0)
        squared = np.minimum(squared, ((offset - direction[:, None] * t) ** 2).sum(0))
    return np.sqrt(squared).reshape(coords.shape[1:])


def _polyline_distance(coords: np.ndarray, points: np.ndarray) -> np.ndarray:
    return _segment_distance(coords, points[:-1], points[1:])


def _balls(coords: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Union of balls, used by the compound shapes."""
    offsets = coords[None] - centres[:, :, None, None, None]
    return (_norm(offsets.transpose(1, 0, 2, 3, 4)) <= radii[:, None, None, None]).any(0)


def _sphere(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    return _norm(c) <= rng.uniform(4.0, 8.0) * s


def _ellipsoid(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    a = rng.uniform(8.0, 12.0) * s
    b = max(1.5, a * rng.uniform(0.35, 0.55))
    d = max(1.5, b * rng.uniform(0.6, 1.0))
    return (c[0] / a) ** 2 + (c[1] / b) ** 2 + (c[2] / d) ** 2 <= 1.0


def _box(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    half = rng.uniform(3.0, 6.5, size=3) * s
    return (np.abs(c) <= half[:, None, None, None]).all(0)


def _cone(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    height = rng.uniform(10.0, 18.0) * s
    base = rng.uniform(4.0, 7.0) * s
    radius = base * (0.5 - c[2] / height)
    return (np.abs(c[2]) <= height / 2) & (np.sqrt(c[0] ** 2 + c[1] ** 2) <= radius)


def _lobed_blob(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    count = rng.integers(3, 5)
    radii = rng.uniform(3.5, 5.5, size=count) * s
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return _balls(c, directions * (radii * rng.uniform(0.6, 0.9, size=count))[:, None], radii)


def _multi_blob(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    count = rng.integers(2, 4)
    angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(count) / count + rng.uniform(-0.2, 0.2, size=count)
    distance = rng.uniform(6.0, 8.0) * s
    centres = np.stack([distance * np.cos(angles), distance * np.sin(angles), rng.uniform(-1, 1, count) * s], 1)
    return _balls(c, centres, rng.uniform(2.5, 4.0, size=count) * s)


def _crescent(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    radius = rng.uniform(5.0, 9.0) * s
    bite = np.array([radius * rng.uniform(0.4, 0.6), 0.0, 0.0])[:, None, None, None]
    return (_norm(c) <= radius) & (_norm(c - bite) > radius * rng.uniform(0.8, 0.95))


def _hollow_shell(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    radius = rng.uniform(6.0, 10.0) * s
    distance = _norm(c)
    return (distance <= radius) & (distance >= radius - 2 * _thickness(rng.uniform(0.8, 1.2), s))


def _torus(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    ring = rng.uniform(5.0, 8.5) * s
    return np.sqrt((np.sqrt(c[0] ** 2 + c[1] ** 2) - ring) ** 2 + c[2] ** 2) <= _thickness(rng.uniform(2.0, 3.0), s)


def _curved_tube(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    half_length = rng.uniform(7.0, 9.0) * s
    t = np.linspace(-half_length, half_length, 24)
    amplitude = rng.uniform(1.0, 3.0, size=2) * s
    frequency = np.pi / half_length * rng.uniform(0.5, 1.0)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    path = np.stack(
        [t, amplitude[0] * np.sin(frequency * t + phase[0]), amplitude[1] * np.sin(frequency * t + phase[1])]
    )
    return _polyline_distance(c, path.T) <= _thickness(rng.uniform(1.5, 2.5), s)


def _branching_tube(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    length = rng.uniform(6.0, 10.0) * s
    angle = np.deg2rad(rng.uniform(25.0, 50.0))
    branches = length * rng.uniform(0.7, 1.0, size=2)
    starts = np.array([[-length, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ends = np.array(
        [
            [0.0, 0.0, 0.0],
            [branches[0] * np.cos(angle), branches[0] * np.sin(angle), 0.0],
            [branches[1] * np.cos(angle), -branches[1] * np.sin(angle), 0.0],
        ]
    )
    return _segment_distance(c, starts, ends) <= _thickness(rng.uniform(1.5, 2.2), s)


def _cross(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    length = rng.uniform(6.0, 10.0) * s
    width = _thickness(rng.uniform(1.2, 2.2), s)
    bars = [np.full(3, width) for _ in range(3)]
    for axis, bar in enumerate(bars):
        bar[axis] = length
    return np.any([(np.abs(c) <= bar[:, None, None, None]).all(0) for bar in bars], axis=0)


def _holed_plate(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    half = rng.uniform(6.0, 8.5) * s
    plate = (np.abs(c[0]) <= half) & (np.abs(c[1]) <= half) & (np.abs(c[2]) <= _thickness(rng.uniform(1.0, 1.5), s))
    return plate & (c[0] ** 2 + c[1] ** 2 > (half * rng.uniform(0.35, 0.55)) ** 2)


def _helix(c: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    coil = rng.uniform(4.0, 6.0) * s
    pitch = rng.uniform(5.0, 6.5) * s
    turns = rng.uniform(1.8, 2.3)
    t = np.linspace(0.0, 2 * np.pi * turns, 48)
    path = np.stack([coil * np.cos(t), coil * np.sin(t), pitch * (t / (2 * np.pi) - turns / 2)], 1)
    return _polyline_distance(c, path) <= _thickness(rng.uniform(1.2, 1.8), s)


CLASS_PAINTERS: dict[str, Painter] = {
    "sphere": _sphere,
    "ellipsoid": _ellipsoid,
    "box": _box,
    "cone": _cone,
    "lobed_blob": _lobed_blob,
    "multi_blob": _multi_blob,
    "crescent": _crescent,
    "hollow_shell": _hollow_shell,
    "torus": _torus,
    "curved_tube": _curved_tube,
    "branching_tube": _branching_tube,
    "cross": _cross,
    "holed_plate": _holed_plate,
    "helix": _helix,
}
CLASS_NAMES: tuple[str, ...] = tuple(CLASS_PAINTERS)
HELD_OUT_LABELS: tuple[str, ...] = ("torus", "multi_blob", "branching_tube")  # a ring, a multi-part, a branching one
CLASS_BASE_HU = np.linspace(90.0, 170.0, len(CLASS_NAMES))  # +-40 HU per subject: the ranges overlap heavily


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random proper rotation (QR of a Gaussian matrix), so orientation carries no class information."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _draw_structure(painter: Painter, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Paint one randomly rotated instance on a local grid and crop it to its bounding box."""
    half = int(np.ceil(MAX_RADIUS * scale)) + 1
    grid = np.indices((2 * half + 1,) * 3, dtype=float) - half
    grid += rng.uniform(-0.5, 0.5, size=3)[:, None, None, None]
    local = np.einsum("ij,j...->i...", _random_rotation(rng).T, grid)
    mask = painter(local, rng, scale)
    if not mask.any():
        return mask[:0, :0, :0]
    corners = np.argwhere(mask)
    return mask[tuple(slice(lo, hi) for lo, hi in zip(corners.min(0), corners.max(0) + 1))]


def _place(
    painter: Painter, rng: np.random.Generator, scale: float, allowed: np.ndarray, occupied: np.ndarray
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Find a spot inside ``allowed`` whose surroundings are free in ``occupied``, or give up.

    ``occupied`` is ``allowed``'s grid padded by the margin on every side, so halos never leave the array.
    Shapes shrink a little with every failed attempt, which helps the last structures into a crowded body.
    Centres are drawn among the free allowed voxels, so few positions are wasted outside the body.
    """
    margin = (occupied.shape[0] - allowed.shape[0]) // 2
    candidates = np.argwhere(allowed & ~occupied[(slice(margin, -margin),) * 3])
    if len(candidates) == 0:
        return None
    for attempt in range(0, MAX_ATTEMPTS, POSITIONS_PER_SHAPE):
        mask = _draw_structure(painter, rng, scale * (1.0 - 0.35 * attempt / MAX_ATTEMPTS))
        free = np.array(allowed.shape) - np.array(mask.shape)
        if mask.size == 0 or (free < 0).any():
            continue
        halo = ndimage.binary_dilation(np.pad(mask, margin), iterations=margin)
        for centre in candidates[rng.integers(0, len(candidates), size=POSITIONS_PER_SHAPE)]:
            corner = np.clip(centre - np.array(mask.shape) // 2, 0, free)
            region = tuple(slice(o, o + n) for o, n in zip(corner, mask.shape))
            padded_region = tuple(slice(o, o + n) for o, n in zip(corner, halo.shape))
            if allowed[region][mask].all() and not occupied[padded_region][halo].any():
                occupied[padded_region] |= halo
                return region, mask
    return None


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Unit-variance smooth random field, the texture of tissues and structures."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / field.std()


def _bias_field(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Smooth multiplicative field (exponential of a random quadratic polynomial), like scanner inhomogeneity."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    terms = [x, y, z, x * y, x * z, y * z, x**2, y**2, z**2]
    return np.exp(sum(coef * term for coef, term in zip(rng.normal(0.0, 0.04, size=len(terms)), terms)))


def _make_subject(
    rng: np.random.Generator, classes: Sequence[int], shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like volume (HU, int16) and its label map (uint8, ``k + 1`` for class index ``k``)."""
    scale = min(shape) / REFERENCE_SIZE
    x, y, z = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    centre = np.array(shape, dtype=float) / 2 - 0.5 + rng.uniform(-2, 2, size=3) * scale
    semi_axes = np.array([rng.uniform(0.42, 0.47) * shape[0], rng.uniform(0.33, 0.38) * shape[1]])
    semi_axes = semi_axes[:, None, None, None] * (
        1 + 0.05 * np.sin(2 * np.pi * z / shape[2] + rng.uniform(0, 2 * np.pi))
    )
    rho = np.sqrt(((x - centre[0]) / semi_axes[0]) ** 2 + ((y - centre[1]) / semi_axes[1]) ** 2)
    skin = 2.0 * max(scale, 0.5) / semi_axes.min()  # subcutaneous fat, as a fraction of the body radius
    body, inside = rho <= 1.0, rho <= 1.0 - skin

    spine = np.hypot(x - centre[0], y - (centre[1] - 0.7 * semi_axes[1])) <= 4.0 * scale
    occupied = np.pad(spine, max(1, round(MARGIN * scale)))
    texture = _smooth_noise(rng, shape, 1.5)
    image = np.full(shape, AIR_HU)
    image[body] = FAT_HU + 10 * texture[body]
    image[inside] = rng.uniform(-10.0, 20.0) + 8 * texture[inside]
    for _ in range(rng.integers(2, 5)):
        fat_centre = centre + rng.uniform(-0.6, 0.6, size=3) * np.array([*semi_axes.mean((1, 2, 3)), shape[2] / 2])
        radii = rng.uniform(3.0, 7.0, size=3)[:, None, None, None] * scale
        fat = (((np.stack([x, y, z]) - fat_centre[:, None, None, None]) / radii) ** 2).sum(0) <= 1.0
        image[fat & inside] = FAT_HU + rng.uniform(-15, 15) + 10 * texture[fat & inside]
    image[spine] = rng.uniform(350.0, 600.0) + 40 * texture[spine]

    label = np.zeros(shape, dtype=np.uint8)
    texture = _smooth_noise(rng, shape, 1.0)
    for k in rng.permutation(np.asarray(classes)):
        placed = _place(CLASS_PAINTERS[CLASS_NAMES[k]], rng, scale, inside & ~spine, occupied)
        if placed is None:
            continue
        region, mask = placed
        label[region][mask] = k + 1
        hu = CLASS_BASE_HU[k] + rng.uniform(-40.0, 40.0) + rng.uniform(4.0, 12.0) * texture[region][mask]
        image[region][mask] = hu

    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 0.9))  # partial volume
    image = (image - AIR_HU) * _bias_field(rng, shape) + AIR_HU  # the bias scales attenuation, not HU
    image += rng.normal(0.0, rng.uniform(8.0, 18.0), size=shape)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label


def _plan_class_subsets(rng: np.random.Generator, num_subjects: int) -> list[list[int]]:
    """Drop 10-25% of the classes per subject, cycling through the classes so that each is dropped equally often."""
    num_classes = len(CLASS_NAMES)
    queue: list[int] = []
    subsets = []
    for _ in range(num_subjects):
        dropped: set[int] = set()
        for _ in range(int(round(num_classes * rng.uniform(0.10, 0.25)))):
            if not queue:
                queue = [k for k in rng.permutation(num_classes).tolist() if k not in dropped]
            dropped.add(queue.pop())
        subsets.append([k for k in range(num_classes) if k not in dropped])
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
    shape: tuple[int, int, int] = (64, 64, 64),
    spacing: float = 1.5,
    seed: int = 0,
) -> Path:
    """Write ``imagesTr``/``labelsTr`` NIfTI files and an MSD-style ``dataset.json``; return the latter's path.

    Subject ``i`` draws its geometry from ``default_rng([seed, i])``, the class subsets from ``default_rng(seed)``.
    """
    output_dir = Path(output_dir)
    (output_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (output_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([float(spacing)] * 3 + [1.0])
    num_subjects = num_training + num_validation
    items = []
    for index, classes in enumerate(_plan_class_subsets(np.random.default_rng(seed), num_subjects)):
        image, label = _make_subject(np.random.default_rng([seed, index]), classes, shape)
        item = {"image": f"imagesTr/demo_{index:03d}.nii.gz", "label": f"labelsTr/demo_{index:03d}.nii.gz"}
        _save(image, affine, output_dir / item["image"])
        _save(label, affine, output_dir / item["label"])
        items.append(item)

    dataset = {
        "name": "IrisDemo",
        "description": "Synthetic CT-like volumes with geometric structures whose intensities overlap, so that "
        "in-context segmentation must rely on shape. Deterministic for a given seed.",
        "reference": "synthetic, generated by scripts/make_demo_data.py",
        "licence": "Apache-2.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(k + 1): name for k, name in enumerate(CLASS_NAMES)}},
        "held_out_labels": list(HELD_OUT_LABELS),
        "numTraining": num_training,
        "numValidation": num_validation,
        "training": items[:num_training],
        "validation": items[num_training:],
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
