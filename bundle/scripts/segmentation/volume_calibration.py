"""Reference-volume calibration: each class's threshold lowered until its object is as large as in the references.

On structures the model never saw in training, its probabilities still rank the voxels well but stay under-confident:
at 0.5 the objects come out too small (``docs/results.md``, the macaque set). A reference says how large the
structure is, so the threshold of each class can be read off the query: the highest probability at which the class's
object reaches the volume it has in the references, never below a floor that keeps a structure the query lacks from
growing into its neighbours. This suits anatomy, whose structures have similar sizes in every subject; not lesions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..data.transforms import largest_component, voxel_volume
from ..errors import IrisInputError


def check_lowest_threshold(lowest_threshold: float) -> None:
    """Refuse a floor outside (0, 0.5]: thresholds are only ever lowered from 0.5."""
    if not 0.0 < lowest_threshold <= 0.5:
        raise IrisInputError(f"lowest_threshold must be in (0, 0.5], got {lowest_threshold}.")


def logit(probability: float) -> float:
    """The logit at which the sigmoid gives ``probability``: thresholds are compared and shifted as logits."""
    return math.log(probability / (1.0 - probability))


class ReferenceVolumeCalibration:
    """Shift each class's logits so that the label map's 0.5 becomes the class's calibrated threshold.

    Args:
        volumes: each class's mean volume (mm³) in the references that label it, in channel order.
        lowest_threshold: the threshold is tried from 0.5 down to this value, in steps of ``step`` and then this
            value.
        largest_component: measure only the largest connected object of each class, as ``keep_largest_component``
            will keep it.
        step: decrement of the tried thresholds.
    """

    def __init__(
        self,
        volumes: Sequence[float],
        lowest_threshold: float = 0.05,
        largest_component: bool = False,
        step: float = 0.05,
    ) -> None:
        check_lowest_threshold(lowest_threshold)
        self.volumes = [float(volume) for volume in volumes]
        self.candidates = [round(float(p), 6) for p in np.arange(0.5, lowest_threshold - 1e-9, -step)]
        if self.candidates[-1] > lowest_threshold + 1e-9:  # a floor between two steps is tried last
            self.candidates.append(float(lowest_threshold))
        self.largest_component = largest_component
        self.thresholds: list[float] = []  # of the last query, reported in summary.json

    def class_threshold(self, logits: torch.Tensor, target_voxels: float) -> float:
        """The highest candidate probability whose object (D x H x W logits above it) reaches ``target_voxels``."""
        logits = logits.cpu()  # once, not once per candidate
        for probability in self.candidates:
            mask = (logits > logit(probability)).numpy()
            if self.largest_component:
                mask = largest_component(mask)
            if mask.sum() >= target_voxels:
                return probability
        return self.candidates[-1]

    def __call__(self, query: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of one query (``logits`` 1 x K x D x H x W, ``query`` its MetaTensor image)."""
        if logits.shape[0] != 1 or logits.shape[1] != len(self.volumes):
            raise ValueError(f"Expected logits of 1 query x {len(self.volumes)} classes, got {tuple(logits.shape)}.")
        voxel = voxel_volume(query)
        self.thresholds = [self.class_threshold(logits[0, k], v / voxel) for k, v in enumerate(self.volumes)]
        shift = torch.tensor([logit(p) for p in self.thresholds], dtype=logits.dtype)
        return logits - shift.to(logits.device).view(1, -1, *[1] * (logits.dim() - 2))
