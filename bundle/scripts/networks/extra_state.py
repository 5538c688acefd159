"""A module's extra state (its settings, the memory bank's class names) stored as a tensor in the state dict.

MONAI's ``copy_model_state`` (used by ``monai.bundle.load``) and other tools read ``.shape`` of every state-dict value
they copy, so every value must be a tensor. The content is plain types, written as UTF-8 JSON in a uint8 tensor: it
still loads with ``torch.load(weights_only=True)``. Models saved by bundle 0.5.0-0.7.8 hold the plain dict itself;
:func:`decode` reads both.
"""

from __future__ import annotations

import json
from typing import Any

import torch


def encode(content: Any) -> torch.Tensor:
    """Plain types (dicts, lists, strings, numbers) as a 1D uint8 tensor of their JSON."""
    return torch.tensor(list(json.dumps(content, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def decode(value: Any, default: Any = None) -> Any:
    """The content of an extra-state entry: decoded from a tensor, or as saved before bundle 0.8.0 (plain types);
    ``default`` when absent."""
    if value is None:
        return default
    if isinstance(value, torch.Tensor):
        return json.loads(bytes(value.to(torch.uint8).tolist()).decode("utf-8")) if value.numel() else default
    return value
