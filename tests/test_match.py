"""The match check: a per-class score of how well a segmented object corresponds to its reference."""

from __future__ import annotations

import torch
from torch import nn

from scripts.networks import build_iris_net
from scripts.segmentation.match import ReferenceMatch, choose_threshold, cycle_dice, match_rates

PATCH = (16, 16, 16)


class IntensityModel(nn.Module):
    """A model that follows its reference by intensity, as a trained IrisNet follows it by look: the task embedding is
    the mean intensity under the reference mask, and a voxel belongs to the class when its intensity is within 0.5 of
    it. It has the two calls the check makes (``encode_support`` and the forward with task embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # the check finds the device through the parameters

    def encode_support(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        mean = (images * masks).flatten(2).sum(-1) / masks.flatten(2).sum(-1).clamp_min(1)  # B x S
        return mean.mean(1).view(-1, 1, 1, 1)  # B x 1 x T=1 x C=1

    def forward(self, query: torch.Tensor, task_embeddings: torch.Tensor) -> torch.Tensor:
        return 0.5 - (query - task_embeddings.view(-1, 1, 1, 1, 1)).abs()  # B x 1 x D x H x W


def scene(bright: float, dark: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A 32³ volume with a bright cube (label 1) next to a darker cube (label 2) of similar intensity."""
    image = torch.zeros(1, 32, 32, 32)
    label = torch.zeros(1, 32, 32, 32, dtype=torch.int16)
    image[:, 8:14, 8:14, 8:14], label[:, 8:14, 8:14, 8:14] = bright, 1
    image[:, 18:24, 8:14, 8:14], label[:, 18:24, 8:14, 8:14] = dark, 2
    return image, label


def test_an_object_of_a_similar_neighbour_is_warned_and_the_requested_structure_is_not() -> None:
    model = IntensityModel()
    reference_image, reference_label = scene(bright=3.0, dark=2.0)
    crop = (slice(None), slice(3, 19), slice(3, 19), slice(3, 19))  # the reference patch, centred on the bright cube
    reference = (reference_image[crop][None], (reference_label[crop] == 1).float()[None])  # 1 x 1 x P each
    with_class, _ = scene(bright=3.1, dark=2.1)
    without_class = with_class.clone()
    without_class[:, 8:14, 8:14, 8:14] = 0.0  # the query lacks the bright structure: only its darker neighbour
    match = ReferenceMatch(model, *reference, PATCH, threshold=0.5)
    for query, expected_warning in ((with_class, False), (without_class, True)):
        logits = model(query[None], model.encode_support(reference[0][:, None], reference[1][:, None]))
        if expected_warning:  # the model, shown the bright reference, marks the darker neighbour (as IRIS does)
            logits = torch.where(query[None] > 1.5, 1.0, -1.0)
        match(query[None], logits)
        (score,) = match.scores
        assert match.warned(score) == expected_warning, score


def test_each_class_is_scored_independently_of_the_other_classes_requested() -> None:
    torch.manual_seed(0)
    network = build_iris_net(base_channels=4, num_heads=2, num_query_tokens=2, channel_multipliers=(1, 2, 4, 8)).eval()
    query = torch.randn(1, 32, 32, 32)
    objects = torch.zeros(3, 32, 32, 32, dtype=torch.bool)
    objects[0, 4:12, 4:12, 4:12] = objects[1, 16:28, 10:20, 5:9] = True  # class 2 found nothing
    images, masks = torch.randn(3, 1, *PATCH), (torch.rand(3, 1, *PATCH) > 0.7).float()
    together = cycle_dice(network, query, objects, images, masks, PATCH)
    alone = [cycle_dice(network, query, objects[[k]], images[[k]], masks[[k]], PATCH)[0] for k in range(3)]
    assert together[2] is None and alone[2] is None
    assert [round(s, 5) for s in together[:2]] == [round(s, 5) for s in alone[:2]]


def test_drop_warned_leaves_warned_classes_out_and_the_threshold_comes_from_true_objects() -> None:
    model = IntensityModel()
    reference_image, reference_label = scene(bright=3.0, dark=2.0)
    crop = (slice(None), slice(3, 19), slice(3, 19), slice(3, 19))
    reference = (reference_image[crop][None], (reference_label[crop] == 1).float()[None])
    query, _ = scene(bright=0.0, dark=2.1)
    logits = torch.where(query[None] > 1.5, 1.0, -1.0)
    kept = ReferenceMatch(model, *reference, PATCH, threshold=0.5)(query[None], logits)
    dropped = ReferenceMatch(model, *reference, PATCH, threshold=0.5, drop_warned=True)(query[None], logits)
    assert (kept > 0).any() and not (dropped > 0).any()
    chosen = choose_threshold([0.1, *[0.8] * 19], [0.05, 0.9])
    assert chosen["threshold"] > 0.1 and chosen["true_objects_warned"] == 0.05 and chosen["false_objects_warned"] == 0.5
    assert match_rates([0.9], [], None)["false_objects_warned"] is None
    assert choose_threshold([], [0.3])["threshold"] is None  # nothing found, as after a short fine-tuning: no warnings
