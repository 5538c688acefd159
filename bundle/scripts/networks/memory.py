"""Class memory bank: per-class task embeddings kept across episodes, stored as buffers of the network.

Buffers grow as classes arrive (rows sorted by class name) and are resized when a checkpoint is loaded, so the bank
travels in ``state_dict`` (``torch.load(weights_only=True)`` friendly); class names travel as the module's extra
state (a list of strings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

_BUFFERS = ("embeddings", "counts", "queue")


class MemoryBank(nn.Module):
    """EMA of each class's task embedding, plus an optional FIFO queue of recent embeddings per class.

    Args:
        num_tokens: tokens per embedding ``m + 1``.
        embed_dim: token width ``C``.
        momentum: EMA weight of the old value, ``T <- a*T + (1-a)*T_new`` (guide 0.9, paper 0.999).
        queue_size: embeddings kept per class for retrieval; 0 keeps none.
        class_names: classes to reserve rows for (zero until first updated or loaded). A bundle lists the classes
            of its released weights here, so that ``net(x)`` of a fresh network already has their output channels.
    """

    def __init__(
        self,
        num_tokens: int,
        embed_dim: int,
        momentum: float = 0.9,
        queue_size: int = 0,
        class_names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory_momentum must be in [0, 1), got {momentum}.")
        if queue_size < 0:
            raise ValueError(f"memory_bank_size must be >= 0, got {queue_size}.")
        self.momentum = momentum
        self.queue_size = queue_size
        self.class_names: list[str] = []
        self.register_buffer("embeddings", torch.zeros(0, num_tokens, embed_dim))  # N x T x C
        self.register_buffer("counts", torch.zeros(0, dtype=torch.long))  # N updates seen per class
        self.register_buffer("queue", torch.zeros(0, queue_size, num_tokens, embed_dim))  # N x Q x T x C
        self._add_classes(class_names)

    def __len__(self) -> int:
        return len(self.class_names)

    def index(self, names: Sequence[str]) -> list[int]:
        """Row of each class name; a ValueError lists the unknown names and the known ones."""
        lookup = {name: i for i, name in enumerate(self.class_names)}
        missing = [name for name in names if name not in lookup]
        if missing:
            raise ValueError(f"Classes {missing} are not in the memory bank; it holds {self.class_names}.")
        return [lookup[name] for name in names]

    def forward(self) -> torch.Tensor:
        """Every stored embedding, K x T x C: the classes of the query-only forward (kept TorchScript-friendly)."""
        if self.embeddings.shape[0] == 0:
            raise RuntimeError("The memory bank is empty: train with use_memory_bank=true or pass task embeddings.")
        return self.embeddings

    def get(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """Stored embeddings (K x T x C) of ``names``, or of every class when None."""
        embeddings = self()
        return embeddings if names is None else embeddings[self.index(names)]

    def _add_classes(self, names: Sequence[str]) -> None:
        """Add rows for unknown classes, keeping the bank sorted by name, so the query-only forward's channel order
        does not depend on the order in which training met the classes."""
        merged = sorted(set(self.class_names).union(names))
        if len(merged) == len(self.class_names):
            return
        position = {name: row for row, name in enumerate(merged)}
        rows = torch.tensor([position[name] for name in self.class_names], dtype=torch.long)
        for name in _BUFFERS:
            old = getattr(self, name)
            grown = old.new_zeros(len(merged), *old.shape[1:])
            grown[rows.to(old.device)] = old
            setattr(self, name, grown)
        self.class_names = merged

    @torch.no_grad()
    def update(self, names: Sequence[str], embeddings: torch.Tensor) -> None:
        """Fold a batch of embeddings into the bank.

        Embeddings of the same class within the batch are averaged first, so one call is one EMA step per class.
        A class seen for the first time takes the new value as it is.

        Args:
            names: global class name of each row, ``dataset/label``.
            embeddings: len(names) x T x C.
        """
        if len(names) != embeddings.shape[0]:
            raise ValueError(f"Got {len(names)} class names for {embeddings.shape[0]} embeddings.")
        if not names:
            return
        self._add_classes(names)
        rows = torch.tensor(self.index(names), device=self.embeddings.device)
        unique_rows, inverse = rows.unique(return_inverse=True)
        sums = self.embeddings.new_zeros(len(unique_rows), *self.embeddings.shape[1:])
        sums.index_add_(0, inverse, embeddings.to(sums))
        means = sums / torch.bincount(inverse, minlength=len(unique_rows)).to(sums)[:, None, None]

        first = self.counts[unique_rows] == 0
        old = self.embeddings[unique_rows]
        blended = self.momentum * old + (1.0 - self.momentum) * means
        self.embeddings[unique_rows] = torch.where(first[:, None, None], means, blended)
        if self.queue_size:
            slots = self.counts[unique_rows] % self.queue_size
            self.queue[unique_rows, slots] = means
        self.counts[unique_rows] += 1

    def get_extra_state(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.class_names = list(state["class_names"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # Resize the growable buffers to the checkpoint's class count before the default copy.
        for name in _BUFFERS:
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape[1:] == getattr(self, name).shape[1:]:
                setattr(self, name, torch.zeros_like(incoming, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
