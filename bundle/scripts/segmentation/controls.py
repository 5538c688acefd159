"""Trivial segmentation rules that in-context Dice is reported against: what a model scores without reading the image
the way the reference asks, on the same cases.

- **intensity rule**: the query voxels inside the reference foreground's 5-95 % intensity range, largest connected
  component. A data set that this rule solves tests thresholds, not in-context learning.
- **position rule**: the reference mask placed at the same normalised position in the query. A data set that this
  rule solves tests an atlas, not in-context learning.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice

from ..data.transforms import largest_component

PERCENTILES = (5.0, 95.0)
CONTROLS = ("intensity_rule", "position_rule")


def intensity_rule(
    reference_image: np.ndarray, reference_mask: np.ndarray, query_image: np.ndarray, percentiles=PERCENTILES
) -> np.ndarray:
    """Largest connected component of the query voxels within the reference foreground's intensity percentiles.

    Args:
        reference_image, reference_mask: D x H x W reference intensities and binary mask of the class.
        query_image: D x H x W query intensities (preprocessed as the reference).

    Returns:
        D x H x W bool prediction (empty when the reference mask is empty).
    """
    values = reference_image[reference_mask.astype(bool)]
    if values.size == 0:
        return np.zeros(query_image.shape, dtype=bool)
    low, high = np.percentile(values, percentiles)
    return largest_component((query_image >= low) & (query_image <= high))


def position_rule(reference_mask: np.ndarray, query_shape: Sequence[int]) -> np.ndarray:
    """The reference mask resampled (nearest neighbour) onto the query grid, i.e. at the same normalised position."""
    mask = torch.as_tensor(np.asarray(reference_mask, dtype=np.float32))[None, None]
    resized = F.interpolate(mask, size=tuple(int(n) for n in query_shape), mode="nearest")
    return resized[0, 0].numpy() > 0.5


def control_dice(
    query_image: np.ndarray,
    query_label: np.ndarray,
    references: Sequence[tuple[np.ndarray, np.ndarray]],
    values: Sequence[int],
) -> np.ndarray:
    """Dice of each rule for each class, with that class's reference.

    Args:
        query_image, query_label: D x H x W query intensities and label map.
        references: per class, the reference's D' x H' x W' intensities and label map.
        values: label value of each class, in the query's and the references' label maps.

    Returns:
        K x 2 Dice of the intensity and position rules (columns in :data:`CONTROLS` order), NaN for classes the
        query does not hold.
    """
    scores = np.full((len(values), len(CONTROLS)), np.nan)
    for k, (value, (reference_image, reference_label)) in enumerate(zip(values, references)):
        truth = query_label == value
        if not truth.any():
            continue
        scores[k, 0] = dice(intensity_rule(reference_image, reference_label == value, query_image), truth)
        scores[k, 1] = dice(position_rule(reference_label == value, query_label.shape), truth)
    return scores


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """MONAI's Dice of two binary arrays (the truth is never empty here)."""
    as_batch = [torch.as_tensor(array)[None, None].float() for array in (prediction, truth)]
    return float(compute_dice(*as_batch, include_background=True, ignore_empty=False))
