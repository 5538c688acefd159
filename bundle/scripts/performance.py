"""Opt-in speed settings that change how tensors are laid out, never what the network computes."""

from __future__ import annotations

import torch
from torch import nn


def channels_last(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Store every 3D convolution's weights channels-last (NDHWC), in place; returns ``network``.

    oneDNN (CPU) and cuDNN pick their faster NDHWC kernels when a convolution's weight is channels-last, and the
    activations follow it, so nothing else has to change. The whole module cannot simply be converted: the memory
    bank and positional-encoding buffers are not 5D. The arithmetic is the same; results differ only by rounding.

    Args:
        network: any module; its ``Conv3d`` and ``ConvTranspose3d`` layers are converted.
        enabled: False returns ``network`` untouched (the config switch ``channels_last``).
    """
    if enabled:
        for module in network.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                module.to(memory_format=torch.channels_last_3d)
    return network
