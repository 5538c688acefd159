"""Residual 3D U-Net encoder shared by support and query images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetResBlock
from torch import nn

NORM = "instance"
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


class ResidualEncoder(nn.Module):
    """One residual stage per entry of ``channels`` (``len(channel_multipliers)`` in ``build_iris_net``); every stage
    but the first halves the resolution (stride 2).

    A stride-2 convolution with kernel 3 keeps a depth of 1, so single-slice (2D) inputs pass unchanged in depth.

    Args:
        in_channels: image channels.
        channels: output channels per stage, ``base_channels * channel_multipliers[i]``.
        blocks_per_stage: residual blocks per stage (the first one downsamples).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], blocks_per_stage: int = 1) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"The encoder needs at least two stages, got channels={list(channels)}.")
        self.channels = tuple(channels)
        stages = []
        previous = in_channels
        for index, width in enumerate(channels):
            blocks = [self._block(previous, width, stride=1 if index == 0 else 2)]
            blocks += [self._block(width, width, stride=1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.stages = nn.ModuleList(stages)

    @staticmethod
    def _block(in_channels: int, out_channels: int, stride: int) -> UnetResBlock:
        return UnetResBlock(3, in_channels, out_channels, kernel_size=3, stride=stride, norm_name=NORM, act_name=ACT)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode ``x`` (N x in_channels x D x H x W).

        Returns:
            Features of every stage, finest first; the last is the bottleneck, each spatial size halved (rounded up)
            ``len(channels) - 1`` times.
        """
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
