"""Atomic file writes, so a crash never leaves a truncated checkpoint or cache entry under its final name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def atomic_save(content: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename it over ``path``.

    A crash leaves either the previous file or the new one, never a truncated checkpoint under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        torch.save(content, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
