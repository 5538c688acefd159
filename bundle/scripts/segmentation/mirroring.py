"""Mirroring test-time augmentation: each window is also segmented mirrored along some axes, and the logits averaged.

nnU-Net predicts this way by default. Training flips patches along every axis, so a mirrored window is as familiar to
the network as the original, and the average of the mirrored predictions is steadier than any one of them (measured
on the demo in docs/inference.md: fewer false objects and a higher seen-class Dice).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch


def check_mirror_axes(axes: Sequence[int] | None) -> tuple[int, ...]:
    """The spatial axes (0, 1, 2 for D, H, W), sorted, or an error that names the bad value."""
    axes = tuple(int(axis) for axis in (axes or ()))
    if any(axis not in (0, 1, 2) for axis in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"mirror_axes must list distinct spatial axes among 0, 1 and 2 (D, H, W), got {list(axes)}.")
    return tuple(sorted(axes))


def mirrored(predictor: Callable[..., torch.Tensor], axes: Sequence[int]) -> Callable[..., torch.Tensor]:
    """``predictor`` (window B x C x D x H x W -> logits B x K x D x H x W) averaged over every combination of
    mirrorings along ``axes`` (2 ** len(axes) passes; axes of size 1, as in 2D windows, are left out)."""
    axes = check_mirror_axes(axes)
    if not axes:
        return predictor

    def predict(window: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dims = [2 + axis for axis in axes if window.shape[2 + axis] > 1]
        total = None
        for count in range(len(dims) + 1):
            for flip in itertools.combinations(dims, count):
                logits = predictor(window.flip(flip) if flip else window, *args, **kwargs)
                logits = (logits.flip(flip) if flip else logits).float()
                total = logits if total is None else total + logits
        return (total / 2 ** len(dims)).to(logits.dtype)

    return predict
