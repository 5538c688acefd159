"""A tiny IrisNet learns to segment what its reference shows, not "the object in the middle" nor "every object"."""

from __future__ import annotations

import torch

from scripts.networks import build_iris_net
from scripts.segmentation.losses import DiceBCELoss
from scripts.training.optimizers import Lamb

SIZE = 16
INTENSITY = (1.0, -1.0)  # the two object kinds differ only in intensity; both are in every volume


def _volumes(generator: torch.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` volumes (count x 1 x S³), one cube of each kind at random places in each; masks count x 2 x S³."""
    images = 0.3 * torch.randn(count, 1, SIZE, SIZE, SIZE, generator=generator)
    masks = torch.zeros(count, 2, SIZE, SIZE, SIZE)
    for index in range(count):
        corners = [torch.randint(0, SIZE // 2 - 5, (3,), generator=generator) for _ in range(2)]
        corners[1] = corners[1] + SIZE // 2  # the two cubes never touch
        order = torch.randperm(2, generator=generator)  # which kind sits in which half
        for kind, corner in zip(order.tolist(), corners):
            x, y, z = corner.tolist()
            masks[index, kind, x : x + 5, y : y + 5, z : z + 5] = 1.0
            images[index, 0] += INTENSITY[kind] * masks[index, kind]
    return images, masks


def _episodes(generator: torch.Generator, count: int) -> tuple[torch.Tensor, ...]:
    """Support and query volumes and, for a random kind per episode (then for the other kind), the support's mask
    (B x S=1 x K=1 x P) and the query's mask of that kind (B x 1 x P)."""
    support, support_masks = _volumes(generator, count)
    query, query_masks = _volumes(generator, count)
    kind = torch.randint(0, 2, (count,), generator=generator)
    rows = torch.arange(count)
    requested, other = support_masks[rows, kind], support_masks[rows, 1 - kind]
    return (
        support[:, None],
        query,
        requested[:, None, None],
        query_masks[rows, kind][:, None],
        other[:, None, None],
        query_masks[rows, 1 - kind][:, None],
    )


def _dice(logits: torch.Tensor, truth: torch.Tensor) -> float:
    prediction = (logits > 0).float()
    return float(2 * (prediction * truth).sum() / (prediction.sum() + truth.sum()).clamp_min(1))


def test_a_short_training_follows_the_reference() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = build_iris_net(base_channels=4, num_query_tokens=2, num_heads=2, channel_multipliers=(1, 2, 4, 8))
    optimizer = Lamb(net.parameters(), lr=1e-2)
    loss_function = DiceBCELoss()
    for _ in range(150):
        support, query, support_masks, target, _, _ = _episodes(generator, 4)
        optimizer.zero_grad()
        loss = loss_function(net(query, net.encode_support(support, support_masks)), target)
        loss.backward()
        optimizer.step()

    net.eval()
    support, query, reference, requested, other_reference, other = _episodes(generator, 16)
    with torch.no_grad():
        logits = net(query, net.encode_support(support, reference))
        swapped = net(query, net.encode_support(support, other_reference))  # the same volumes, the other kind marked
    scores = [_dice(logits, requested), _dice(logits, other), _dice(swapped, other), _dice(swapped, requested)]
    assert scores[0] > 0.7 and scores[2] > 0.7, scores  # it segments what the reference marks...
    assert scores[1] < 0.1 and scores[3] < 0.1, scores  # ...and not the other object of the same query
