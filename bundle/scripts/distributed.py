"""Small helpers for torch.distributed runs (torchrun + DDP); each is a no-op in a single process."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn


def is_main_process() -> bool:
    """True on rank 0, or when not distributed: the process that logs and writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel (or other ``.module``) wrapper."""
    return network.module if hasattr(network, "module") else network
