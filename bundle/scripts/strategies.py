"""IRIS inference strategies: how the task embeddings of the requested classes are obtained.

Each strategy returns ``1 x K x (m+1) x C`` embeddings; all but retrieval are computed once and reused for every
query and every sliding window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .losses import DiceBCELoss
from .support import Reference

STRATEGIES = ("one_shot", "ensemble", "retrieval", "tuning", "memory")


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy '{strategy}'; choose one of {STRATEGIES}.")
    return strategy


def _device(network: nn.Module) -> torch.device:
    return next(network.parameters()).device


def reference_patches(
    references: Sequence[Reference], values: Sequence[int], patch_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches of every (reference, class) pair: images and masks, each (R*K) x 1 x 1 x P."""
    pairs = [reference.patch(value, patch_size) for reference in references for value in values]
    images = torch.stack([image for image, _ in pairs])[:, None]
    masks = torch.stack([mask for _, mask in pairs]).float()[:, None]
    return images, masks


@torch.no_grad()
def encode_references(
    network: nn.Module, references: Sequence[Reference], values: Sequence[int], patch_size: Sequence[int]
) -> torch.Tensor:
    """Task embedding of every class in every reference, each class from a patch around it: R x K x T x C."""
    images, masks = reference_patches(references, values, patch_size)
    device = _device(network)
    embeddings = network.encode_support(images.to(device), masks.to(device))  # (R*K) x 1 x T x C
    return embeddings.reshape(len(references), len(values), *embeddings.shape[2:])


def one_shot(per_reference: torch.Tensor) -> torch.Tensor:
    """The first reference alone."""
    return per_reference[:1]


def ensemble(per_reference: torch.Tensor) -> torch.Tensor:
    """Context ensemble: the mean embedding over references."""
    return per_reference.mean(0, keepdim=True)


def memory(network: nn.Module, class_names: Sequence[str]) -> torch.Tensor:
    """Stored memory-bank embeddings of seen classes; no reference needed."""
    if network.memory_bank is None:
        raise ValueError("Strategy 'memory' needs a network trained with use_memory_bank=true.")
    return network.memory_bank.get(list(class_names)).unsqueeze(0)


def retrieve(per_reference: torch.Tensor, query_embeddings: torch.Tensor, top_k: int) -> torch.Tensor:
    """Object-level retrieval: per class, average the ``top_k`` references most similar (cosine) to the query object.

    Args:
        per_reference: R x K x T x C reference embeddings.
        query_embeddings: 1 x K x T x C embeddings of the objects first found in the query.
        top_k: references kept per class.
    """
    similarity = F.cosine_similarity(per_reference.flatten(2), query_embeddings.flatten(2), dim=-1)  # R x K
    best = similarity.topk(min(top_k, per_reference.shape[0]), dim=0).indices  # top_k x K
    chosen = torch.gather(per_reference, 0, best[..., None, None].expand(-1, -1, *per_reference.shape[2:]))
    return chosen.mean(0, keepdim=True)


def tuning_patches(
    references_per_class: Sequence[Sequence[Reference]], values: Sequence[int], patch_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every reference patch of every class: images N x 1 x P, masks N x P and the class index of each patch (N)."""
    images, masks, classes = [], [], []
    for index, (references, value) in enumerate(zip(references_per_class, values)):
        for reference in references:
            image, mask = reference.patch(value, patch_size)
            images.append(image)
            masks.append(mask[0].float())
            classes.append(index)
    return torch.stack(images), torch.stack(masks), torch.tensor(classes)


def tune(
    network: nn.Module,
    initial: torch.Tensor,
    patches: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    steps: int = 20,
    lr: float = 1e-3,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """In-context tuning: optimise only the task embeddings (Adam) to segment the references' own patches.

    The network is frozen (no parameter receives a gradient); each reference patch supervises only its own class.

    Args:
        initial: 1 x K x T x C starting embeddings (usually the ensemble).
        patches: output of :func:`tuning_patches`.
        on_step: called with ``(step, loss)`` after every step, e.g. to log the support loss.
    """
    device = _device(network)
    images, masks, classes = (t.to(device) for t in patches)  # N x 1 x P, N x P, N
    own_class = F.one_hot(classes, initial.shape[1]).bool()  # N x K
    target = masks[:, None] * own_class[(...,) + (None,) * (masks.dim() - 1)]  # N x K x P, only its class supervised
    embeddings = initial.detach().clone().to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([embeddings], lr=lr)
    loss_fn = DiceBCELoss()
    was_training = network.training
    network.eval()
    requires_grad = [p.requires_grad for p in network.parameters()]
    network.requires_grad_(False)
    try:
        for step in range(steps):
            optimizer.zero_grad()
            with torch.enable_grad():
                logits = network(images, embeddings.expand(images.shape[0], -1, -1, -1))
                loss = loss_fn(logits, target, own_class)
                loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step(step, loss.item())
    finally:
        for parameter, flag in zip(network.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        network.train(was_training)
    return embeddings.detach()
