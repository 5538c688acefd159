"""Reference-volume calibration: each class's threshold from the volume its references give it."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import MetaTensor

from scripts.segmentation.volume_calibration import ReferenceVolumeCalibration

SPACING = 2.0  # mm: one voxel is 8 mm³


def query(shape: tuple[int, int, int] = (24, 24, 24)) -> MetaTensor:
    return MetaTensor(torch.zeros(1, 1, *shape), affine=torch.diag(torch.tensor([SPACING] * 3 + [1.0])))


def blob_logits(shape: tuple[int, int, int], centre: tuple[int, int, int], scale: float) -> torch.Tensor:
    """Logits that fall with the distance from ``centre``: 0.5 at ``scale`` voxels, lower probabilities further out."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    distance = (grid - torch.tensor(centre, dtype=torch.float32).view(3, 1, 1, 1)).norm(dim=0)
    return 1.0 - distance / scale


def voxels_above(logits: torch.Tensor, probability: float) -> int:
    return int((logits > math.log(probability / (1 - probability))).sum())


def test_threshold_is_the_highest_whose_object_reaches_the_reference_volume() -> None:
    shape = (24, 24, 24)
    logits = blob_logits(shape, (12, 12, 12), 4.0)  # the 0.5 object is a ball of radius 4 voxels
    at = {p: voxels_above(logits, p) for p in (0.5, 0.45, 0.4, 0.35, 0.3)}
    assert at[0.5] < at[0.45] < at[0.4] < at[0.35]
    # a reference volume between the objects at 0.4 and 0.35: 0.35 is the highest threshold that reaches it
    volumes = [(at[0.4] + 1) * SPACING**3, 0.5 * at[0.5] * SPACING**3, 1e9]  # larger, smaller, unreachable
    calibration = ReferenceVolumeCalibration(volumes, lowest_threshold=0.15)
    calibrated = calibration(query(shape), logits.expand(1, 3, *shape).clone())
    assert calibration.thresholds == pytest.approx([0.35, 0.5, 0.15])  # never above 0.5, never below the floor
    for k, probability in enumerate(calibration.thresholds):
        assert int((calibrated[0, k] > 0).sum()) == voxels_above(logits, probability)  # 0 is the new 0.5
    assert int((calibrated[0, 0] > 0).sum()) * SPACING**3 >= volumes[0]
    between_steps = ReferenceVolumeCalibration([1e9], lowest_threshold=0.12)  # a floor between two steps
    between_steps(query(shape), logits[None, None])
    assert between_steps.thresholds == [0.12]


def test_each_class_is_calibrated_on_its_own_channel_and_largest_component_measures_one_object() -> None:
    shape = (24, 24, 40)
    near, far = blob_logits(shape, (12, 12, 8), 3.0), blob_logits(shape, (12, 12, 32), 3.0)
    two_objects = torch.maximum(near, far)  # two equal balls: at 0.5 together twice the volume of one
    one = voxels_above(near, 0.5)
    volumes = [1.5 * one * SPACING**3] * 2
    logits = torch.stack([two_objects, near])[None]
    whole = ReferenceVolumeCalibration(volumes)
    whole(query(shape), logits)
    assert whole.thresholds[0] == 0.5  # both objects together already reach 1.5 balls
    largest = ReferenceVolumeCalibration(volumes, largest_component=True)
    largest(query(shape), logits)
    assert largest.thresholds[0] < 0.5  # one ball must grow to 1.5 of its 0.5 volume
    assert largest.thresholds[0] == largest.thresholds[1] == whole.thresholds[1]  # the second class alone as well


def test_bad_floor_and_plain_tensor_query_are_refused() -> None:
    with pytest.raises(ValueError, match="lowest_threshold"):
        ReferenceVolumeCalibration([1.0], lowest_threshold=0.6)
    with pytest.raises(TypeError, match="MetaTensor"):
        ReferenceVolumeCalibration([1.0])(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))
