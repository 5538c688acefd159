"""Class memory bank: per-class task embeddings kept across episodes, stored as buffers of the network.

Buffers grow as classes arrive (rows sorted by class name) and are resized when a checkpoint is loaded, so the bank
travels in ``state_dict`` (``torch.load(weights_only=True)`` friendly); class names travel as the module's extra
state (a tensor, see :mod:`.extra_state`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import extra_state

_BUFFERS = ("embeddings", "counts")


class MemoryBank(nn.Module):
    """EMA of each class's task embedding.

    Args:
        num_tokens: tokens per embedding ``T``: the foreground token, the ``m`` context tokens and one prototype per
            encoder stage but the bottleneck (``TaskEncoder.num_tokens``).
        embed_dim: token width ``C``.
        momentum: EMA weight of the old value, ``e <- a*e + (1-a)*e_new`` (guide 0.9, paper 0.999).
        class_names: classes to reserve rows for (zero until first updated or loaded). A bundle lists the classes
            of its released weights here, so that ``net(x)`` of a fresh network already has their output channels.
    """

    def __init__(self, num_tokens: int, embed_dim: int, momentum: float = 0.9, class_names: Sequence[str] = ()) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"network_def#memory_momentum must be in [0, 1), got {momentum}.")
        self.momentum = momentum
        self.class_names: list[str] = []
        self.register_buffer("embeddings", torch.zeros(0, num_tokens, embed_dim))  # N x T x C
        self.register_buffer("counts", torch.zeros(0, dtype=torch.long))  # N updates seen per class
        self.add_classes(class_names)

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
            raise RuntimeError("The memory bank is empty: train with use_memory_bank=True or pass task embeddings.")
        return self.embeddings

    def get(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """Stored embeddings (K x T x C) of ``names``, or of every class when None."""
        embeddings = self()
        return embeddings if names is None else embeddings[self.index(names)]

    def add_classes(self, names: Sequence[str]) -> None:
        """Add rows (zero, never updated) for unknown classes, keeping the bank sorted by name, so the query-only
        forward's channel order does not depend on the order in which training met the classes."""
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
        """Fold a batch of embeddings (len(names) x T x C) of the classes ``names`` (``dataset/label``) into the bank,
        adding rows for new classes (see :meth:`update_rows`)."""
        if len(names) != embeddings.shape[0]:
            raise ValueError(f"Got {len(names)} class names for {embeddings.shape[0]} embeddings.")
        self.add_classes(names)
        self.update_rows(torch.tensor(self.index(names), dtype=torch.long, device=self.embeddings.device), embeddings)

    @torch.no_grad()
    def update_rows(self, rows: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Fold a batch of embeddings (V x T x C) into the bank rows ``rows`` (V, long; -1 skips an embedding).

        Embeddings of the same class within the batch are averaged first, so one call is one EMA step per class.
        A class seen for the first time takes the new value as it is. Everything stays on the bank's device, without
        a host synchronisation, so training can call it every iteration.
        """
        count = len(self.class_names)
        rows = rows.to(self.embeddings.device)
        target = torch.where(rows >= 0, rows, count)  # skipped embeddings go to a spare row, dropped below
        sums = self.embeddings.new_zeros(count + 1, *self.embeddings.shape[1:])
        sums.index_add_(0, target, embeddings.to(sums))
        seen = self.counts.new_zeros(count + 1).index_add_(0, target, torch.ones_like(target))[:count]
        means = sums[:count] / seen.clamp(min=1).to(sums)[:, None, None]
        blended = self.momentum * self.embeddings + (1.0 - self.momentum) * means
        first = (self.counts == 0)[:, None, None]
        updated = torch.where(first, means, blended)
        self.embeddings.copy_(torch.where((seen > 0)[:, None, None], updated, self.embeddings))
        self.counts += (seen > 0).long()

    def get_extra_state(self) -> torch.Tensor:
        return extra_state.encode({"class_names": list(self.class_names)})

    def set_extra_state(self, state: torch.Tensor | dict[str, Any]) -> None:
        self.class_names = list(extra_state.decode(state)["class_names"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # Resize the growable buffers to the checkpoint's class count before the default copy. Models saved before
        # bundle 0.7.0 also hold a FIFO queue that nothing read: it is dropped.
        state_dict.pop(prefix + "queue", None)
        for name in _BUFFERS:
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape[1:] == getattr(self, name).shape[1:]:
                setattr(self, name, torch.zeros_like(incoming, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
