"""Atomic file writes, so a crash never leaves a truncated checkpoint, cache entry or dataset.json under its name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_save(content: Any, path: str | Path) -> None:
    """``torch.save`` atomically: a crash leaves either the previous file or the new one, never a truncated one."""
    _atomic_write(path, lambda handle: torch.save(content, handle))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write UTF-8 text atomically (see :func:`atomic_save`)."""
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
