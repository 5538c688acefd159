"""Speed settings: memory layout (never what the network computes) and where mixed precision pays."""

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


def mixed_precision_is_fast(device: str | torch.device) -> bool:
    """Whether autocast speeds a step up on ``device``, the default of the config switch ``amp``.

    Always on CUDA (fp16 with a GradScaler). On a CPU, bf16 only pays with native bf16 instructions (AVX-512 BF16 or
    AMX); without them oneDNN emulates bf16 and a step is many times slower (measured in docs/benchmarks.md).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)
