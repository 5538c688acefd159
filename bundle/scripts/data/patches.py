"""Patches of volumes: crops around a voxel (zero-padded at the borders), the patch size of 2D images, binary masks.

Shared by the training episodes (:mod:`scripts.data.episodes`) and by inference, which crops references the way
training does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import SpatialCrop, pad_nd
from monai.utils import convert_to_tensor

from .pool import Subject
from .transforms import is_single_slice


def patch_size_for(volume: torch.Tensor, patch_size: Sequence[int]) -> tuple[int, ...]:
    """``patch_size`` for a C x D x H x W volume: depth 1 on the last axis for a single-slice (2D) image."""
    return patch_shape(is_single_slice(volume), patch_size)


def patch_shape(single_slice: bool, patch_size: Sequence[int]) -> tuple[int, ...]:
    """``patch_size``, with depth 1 on the last axis for a single-slice (2D) image."""
    return (*patch_size[:-1], 1) if single_slice else tuple(patch_size)


def crop_patch(volume: torch.Tensor, center: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """Crop a C x D x H x W volume to ``patch_size`` (see :func:`patch_size_for`) around ``center``; the parts
    outside the volume are zeros, so ``center`` is always the patch's centre voxel (``size // 2``).

    MONAI's window (``SpatialCrop.compute_slices``) and ``pad_nd``, not the ``SpatialCrop(roi_center)`` transform: it
    shifts a window that crosses the lower border, and its MetaTensor tracking would cost every patch of every episode.
    """
    size = patch_size_for(volume, patch_size)
    starts = [int(c) - n // 2 for c, n in zip(center, size)]
    inside = SpatialCrop.compute_slices(roi_start=starts, roi_end=[start + n for start, n in zip(starts, size)])
    piece = convert_to_tensor(volume, track_meta=False)[(slice(None), *inside)]
    before = [min(max(-start, 0), n) for start, n in zip(starts, size)]
    after = [n - b - m for n, b, m in zip(size, before, piece.shape[1:])]
    return pad_nd(piece, [(0, 0), *zip(before, after)])


def bounding_box_centre(coords: np.ndarray | torch.Tensor) -> list[int]:
    """Centre of the bounding box of N x 3 voxel coordinates."""
    coords = torch.as_tensor(coords)
    return ((coords.min(0).values + coords.max(0).values) // 2).tolist()


def crop_around(subject: Subject, center: Sequence[int], patch_size: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Crop image and label (1 x D x H x W each) to ``patch_size`` around ``center``, zero-padding at the borders."""
    return tuple(crop_patch(volume, center, patch_size) for volume in subject.volumes())


def binary_masks(label: torch.Tensor, values: Sequence[int], num_slots: int) -> torch.Tensor:
    """One binary channel per class value (K_max x D x H x W, uint8); slots beyond ``values`` stay empty.

    Not ``monai.networks.utils.one_hot``: it needs channel indices 0..K-1, and mapping arbitrary label values to
    slots (other values to none) is this same loop.
    """
    masks = torch.zeros((num_slots, *label.shape[1:]), dtype=torch.uint8)
    for slot, value in enumerate(values):
        masks[slot] = label[0] == value
    return masks
