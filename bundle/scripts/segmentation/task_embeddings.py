"""Task embeddings from references: encoding, the first reference, the mean, tuning, the memory bank.

The building blocks of the strategies in :mod:`scripts.inference.strategies`. Each result is ``1 x K x T x C``,
computed once and reused for every query and every sliding window (retrieval, which chooses per query, is
:class:`scripts.segmentation.inferers.RetrievalInferer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .losses import DiceBCELoss
from .support import Reference


def _device(network: nn.Module) -> torch.device:
    return next(network.parameters()).device


@torch.no_grad()
def encode_references(
    network: nn.Module,
    references_per_class: Sequence[Sequence[Reference]],
    values: Sequence[int],
    patch_size: Sequence[int],
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Task embedding of each class from each of its references, each from a patch around the class.

    Classes may have different references (a datastore's label maps rarely all hold the same classes), so the result
    is padded: ``R x K x T x C`` embeddings and an ``R x K`` mask of the slots that hold one, with R the largest
    number of references of a class. Patches are encoded ``batch_size`` at a time to bound memory.
    """
    slots = [(r, k) for k, refs in enumerate(references_per_class) for r in range(len(refs))]
    if any(not refs for refs in references_per_class):
        raise ValueError("Every class needs at least one reference.")
    device = _device(network)
    encoded = []
    for start in range(0, len(slots), batch_size):
        pairs = [references_per_class[k][r].patch(values[k], patch_size) for r, k in slots[start : start + batch_size]]
        images = torch.stack([image for image, _ in pairs])[:, None].to(device)  # N x 1 x 1 x P
        masks = torch.stack([mask for _, mask in pairs]).float()[:, None].to(device)
        encoded.append(network.encode_support(images, masks)[:, 0])  # N x T x C
    embeddings = torch.cat(encoded)
    rows, columns = torch.tensor(slots).T
    per_reference = embeddings.new_zeros(int(rows.max()) + 1, len(values), *embeddings.shape[1:])
    present = torch.zeros(per_reference.shape[:2], dtype=torch.bool, device=device)
    per_reference[rows, columns] = embeddings
    present[rows, columns] = True
    return per_reference, present


def one_shot(per_reference: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Each class from its first reference alone."""
    first = present.int().argmax(0)  # K, the first slot holding each class
    return per_reference[first, torch.arange(per_reference.shape[1])][None]


def ensemble(per_reference: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Context ensemble: each class's mean embedding over its references."""
    weights = present.to(per_reference.dtype)[..., None, None]
    return ((per_reference * weights).sum(0) / weights.sum(0))[None]


def memory(network: nn.Module, class_names: Sequence[str]) -> torch.Tensor:
    """Stored memory-bank embeddings of seen classes; no reference needed."""
    bank = network.memory_bank
    if bank is None:
        raise ValueError("Strategy 'memory' needs a network trained with use_memory_bank=True.")
    rows = bank.index(list(class_names))
    untrained = [name for name, row in zip(class_names, rows) if int(bank.counts[row]) == 0]
    if untrained:
        raise ValueError(f"Classes {untrained} have a memory-bank row but no embedding: training never requested them.")
    return bank.get(list(class_names)).unsqueeze(0)


def tuning_patches(
    references_per_class: Sequence[Sequence[Reference]], values: Sequence[int], patch_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every reference patch of every class: images N x 1 x P, the masks of all K classes on each patch N x K x P, and
    which classes each patch's reference labels (N x K): the targets of in-context tuning."""
    images, masks, labelled = [], [], []
    for references, value in zip(references_per_class, values):
        for reference in references:
            image, mask, known = reference.labelled_patch(value, values, patch_size)
            images.append(image)
            masks.append(mask.float())
            labelled.append(known)
    return torch.stack(images), torch.stack(masks), torch.stack(labelled)


def tune(
    network: nn.Module,
    initial: torch.Tensor,
    patches: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    steps: int = 20,
    lr: float = 1e-3,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """In-context tuning: optimise only the task embeddings (Adam) to segment the references as they are labelled.

    The network is frozen (no parameter receives a gradient). Every class is supervised on every reference patch
    whose reference labels it: segment it where it is, nothing where it is not, so a class's embedding also learns to
    leave the neighbouring structures of the other patches alone. Classes a reference does not label are left out.

    Args:
        initial: 1 x K x T x C starting embeddings (usually the ensemble).
        patches: output of :func:`tuning_patches`.
        on_step: called with ``(step, loss)`` after every step, e.g. to log the support loss.
    """
    device = _device(network)
    images, target, labelled = (t.to(device) for t in patches)  # N x 1 x P, N x K x P, N x K
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
                loss = loss_fn(logits, target, labelled)
                loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step(step, loss.item())
    finally:
        for parameter, flag in zip(network.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        network.train(was_training)
    return embeddings.detach()
