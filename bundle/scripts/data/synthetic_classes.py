"""Synthetic classes: structures drawn afresh for one episode and pasted into its query and references.

A model trained on a handful of classes can learn each of them as a detector and then match the reference of a new
structure to the nearest one it knows (docs/training.md). A structure that exists only in one episode cannot be
memorised: its reference is the only way to find it, and when the query lacks it, the only way to know that a similar
real structure is not the answer. The structures are generic (an ellipsoid with an intensity level taken from the
patch, a random texture, optionally a wall of another intensity), so the same augmentation serves any modality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

SYNTHETIC_LABELS = (32767, 32766)  # label values of a synthetic class and of a synthetic distractor (int16)


@dataclass(frozen=True)
class SyntheticClass:
    """How one synthetic class looks; each pasted instance varies its size and orientation.

    Args:
        radii: semi-axes of its ellipsoid, as fractions of the patch size.
        level: its mean intensity (the units of the normalised image).
        texture_sigma: correlation length (voxels) of its random texture.
        texture_amplitude: standard deviation of that texture.
        wall: intensity offset of its outer layer (0: no wall).
    """

    radii: tuple[float, float, float]
    level: float
    texture_sigma: float
    texture_amplitude: float
    wall: float

    @classmethod
    def draw(cls, rng: np.random.Generator, image: torch.Tensor, label: torch.Tensor) -> SyntheticClass:
        """A class whose level is that of a random labelled voxel of ``image`` (any voxel if none is labelled), so
        that intensity alone does not tell it from the structures around it."""
        labelled = label[0] > 0
        values = image[0][labelled] if bool(labelled.any()) else image[0].flatten()
        level = float(values[rng.integers(len(values))]) + rng.uniform(-0.3, 0.3)
        wall = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.6)) if rng.random() < 0.5 else 0.0
        return cls(
            radii=tuple(float(r) for r in rng.uniform(0.1, 0.25, size=3)),
            level=level,
            texture_sigma=float(rng.uniform(0.6, 2.0)),
            texture_amplitude=float(rng.uniform(0.0, 0.4)),
            wall=wall,
        )

    def paste(
        self, rng: np.random.Generator, image: torch.Tensor, label: torch.Tensor, centre: np.ndarray | None, value: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An instance of the class in ``image`` (C x D x H x W) and ``label`` (1 x D x H x W) around ``centre`` (a
        random place where it fits whole when None), labelled ``value``; it hides what lay beneath it."""
        shape = np.array(image.shape[1:])
        radii = np.array(self.radii) * shape * rng.uniform(0.85, 1.15, size=3)
        if centre is None:
            reach = np.minimum(np.ceil(radii.max()), shape // 2)
            centre = rng.uniform(reach, np.maximum(shape - reach, reach + 1))
        rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
        local = rotation.T @ (grid - np.asarray(centre, dtype=float)[:, None])
        mask = (((local / radii[:, None]) ** 2).sum(0) <= 1.0).reshape(shape)
        if not mask.any():
            return image, label
        texture = ndimage.gaussian_filter(rng.standard_normal(shape), self.texture_sigma)
        texture *= self.texture_amplitude / max(float(texture.std()), 1e-6)
        appearance = self.level + texture + 0.05 * rng.standard_normal(shape)
        if self.wall:
            appearance += self.wall * (mask & ~ndimage.binary_erosion(mask, iterations=1))
        alpha = ndimage.gaussian_filter(mask.astype(np.float32), 0.6)  # a partial-volume edge, not a cut-out
        blended = (1.0 - alpha) * image.numpy() + alpha * appearance  # the same look in every channel
        image = torch.from_numpy(blended.astype(np.float32))
        label = label.clone()
        label[0][torch.from_numpy(alpha > 0.5)] = value
        return image, label
