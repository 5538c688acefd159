"""Does a segmented object match its reference? The cycle check, and its threshold chosen on training data.

Asked for a structure that the query lacks, the model marks the most similar structure instead, confidently: no
threshold on its logits tells the two apart (docs/training.md). Segmenting *back* does: take the predicted object as
a reference and segment the reference patch with it. An object of the requested structure finds the reference's
structure again (high Dice); an object of a neighbouring structure finds that neighbour, not the reference's mask
(low Dice). The cycle costs two network passes per class on one patch, next to a whole sliding-window inference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from torch import nn

from ..data.patches import bounding_box_centre, crop_around, crop_patch
from ..data.pool import DatasetPool
from ..data.transforms import label_map

WARNED_SHARE_OF_TRUE_OBJECTS = 0.05  # the threshold warns this share of the true objects of the training data


@torch.no_grad()
def cycle_dice(
    network: nn.Module,
    query: torch.Tensor,
    objects: torch.Tensor,
    reference_images: torch.Tensor,
    reference_masks: torch.Tensor,
    patch_size: Sequence[int],
) -> list[float | None]:
    """Each class's match score: the Dice, on its reference patch, of the reference's mask and what the predicted
    object finds there when it is the reference.

    Args:
        network: the IrisNet (``encode_support`` and the forward with task embeddings).
        query: 1 x D x H x W query volume (preprocessed, as segmented).
        objects: K x D x H x W binary predictions of the K classes in the query.
        reference_images, reference_masks: K x 1 x P reference patch of each class and its binary mask.
        patch_size: the patch size that references are encoded at.

    Returns:
        K scores in [0, 1], None for a class with nothing predicted.
    """
    present = [k for k in range(objects.shape[0]) if bool(objects[k].any())]
    scores: list[float | None] = [None] * objects.shape[0]
    if not present:
        return scores
    images, masks = [], []
    for k in present:  # a patch around each predicted object, as references are cropped around their class
        centre = bounding_box_centre(objects[k].nonzero())
        images.append(crop_patch(query, centre, patch_size))
        masks.append(crop_patch(objects[k][None].float(), centre, patch_size))
    device = next(network.parameters()).device
    found = torch.stack(images)[:, None].to(device), torch.stack(masks)[:, None].to(device)  # N x 1 x 1 x P
    embeddings = network.encode_support(*found)  # N x 1 x T x C: each object as a reference
    logits = network(reference_images[present].to(device), embeddings)  # N x 1 x P: the reference segmented back
    dice = compute_dice(
        (logits > 0).float(), reference_masks[present].to(device).float(), include_background=True, ignore_empty=False
    )
    for k, value in zip(present, dice[:, 0].tolist()):
        scores[k] = float(np.nan_to_num(value))
    return scores


def choose_threshold(true_scores: Sequence[float], false_scores: Sequence[float]) -> dict:
    """The warning threshold from the match scores of objects of the requested structure (``true_scores``) and of
    objects predicted for a structure the query lacks (``false_scores``), both on training data: the score below
    which ``WARNED_SHARE_OF_TRUE_OBJECTS`` of the true objects lie. Returns it with what it does on those data; the
    threshold is None (no warnings) when no true object was found, as after a few iterations of fine-tuning."""
    threshold = (
        round(float(np.quantile(np.asarray(true_scores), WARNED_SHARE_OF_TRUE_OBJECTS)), 4) if true_scores else None
    )
    return match_rates(true_scores, false_scores, threshold)


class ReferenceMatch:
    """The match check of one task at inference: each class's first reference patch, the model's threshold, and what
    to do with a class below it.

    Called with a query (1 x 1 x D x H x W) and its logits (1 x K x D x H x W), it scores the objects the label map
    gives each class (what inference writes), keeps the scores in :attr:`scores` and, with ``drop_warned``, returns
    the logits with the warned classes removed.

    Args:
        network: the IrisNet.
        reference_images, reference_masks: K x 1 x P reference patch of each class and its mask.
        patch_size: the patch size references are encoded at.
        threshold: scores below it get a warning (the model records it, see
            :class:`scripts.training.match_calibration.MatchCalibration`); None: none.
        drop_warned: leave warned classes out of the label map.
    """

    def __init__(
        self,
        network: nn.Module,
        reference_images: torch.Tensor,
        reference_masks: torch.Tensor,
        patch_size: Sequence[int],
        threshold: float | None = None,
        drop_warned: bool = False,
    ) -> None:
        self.network = network
        self.reference_images, self.reference_masks = reference_images, reference_masks
        self.patch_size = tuple(patch_size)
        self.threshold = threshold
        self.drop_warned = drop_warned
        self.scores: list[float | None] = []

    def warned(self, score: float | None) -> bool:
        return score is not None and self.threshold is not None and score < self.threshold

    def __call__(self, query: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if query.shape[0] != 1:
            raise ValueError(f"The match check scores one query at a time, got a batch of {query.shape[0]}.")
        values = torch.arange(1, logits.shape[1] + 1, dtype=torch.int16, device=logits.device)
        objects = label_map(logits[0].float(), values) == values.view(-1, *[1] * (logits.ndim - 2))
        self.scores = cycle_dice(
            self.network, query[0], objects.cpu(), self.reference_images, self.reference_masks, self.patch_size
        )
        if self.drop_warned and any(self.warned(score) for score in self.scores):
            logits = logits.clone()
            for k, score in enumerate(self.scores):
                if self.warned(score):
                    logits[:, k] = torch.finfo(logits.dtype).min
        return logits


@torch.no_grad()
def object_scores(
    network: nn.Module,
    queries: DatasetPool,
    references: DatasetPool,
    inferer: Callable,
    patch_size: Sequence[int],
    subjects: int = 8,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """Match scores of the objects found in the first ``subjects`` subjects of ``queries``, each segmented (whole, as
    validation does) for every trainable class of its dataset with a reference from another subject of
    ``references``: those of classes the subject holds, and those of classes it lacks that cover more than a tenth of
    the class's mean volume (false objects).

    Args:
        network: the IrisNet, in eval mode.
        queries, references: pools of the same datasets (the training pool twice, to calibrate).
        inferer: the validation's sliding-window inferer, called as ``inferer(image, network, task_embeddings=...)``.
        patch_size: the training patch size.
        subjects: query subjects segmented.
        seed: seed of the reference draw.
    """
    rng = np.random.default_rng(seed)
    mean_voxels = references.mean_class_voxels()
    true_scores: list[float] = []
    false_scores: list[float] = []
    device = next(network.parameters()).device
    for subject in queries.subjects[:subjects]:
        info = queries.datasets[subject.dataset]
        values, images, masks = [], [], []
        for value in sorted(info.labels):
            others = [s for s in references.holders(info.name, value) if s.image_path != subject.image_path]
            if queries.is_held_out(subject.dataset, value) or not others:
                continue
            reference = others[rng.integers(len(others))]
            image, label = crop_around(reference, bounding_box_centre(reference.foreground[value]), patch_size)
            values.append(value)
            images.append(image)
            masks.append((label == value).float())
        if not values:
            continue
        reference_images, reference_masks = torch.stack(images), torch.stack(masks)  # K x 1 x P
        embeddings = network.encode_classes(reference_images[None, :, None].to(device),
                                            reference_masks[None, :, None].to(device))  # fmt: skip
        logits = inferer(subject.image[None].to(device), network, task_embeddings=embeddings)[0].float().cpu()
        scores = cycle_dice(network, subject.image, logits > 0, reference_images, reference_masks, patch_size)
        for value, channel, score in zip(values, logits, scores):
            if score is None:
                continue
            if value in subject.classes:
                true_scores.append(score)
            elif float((channel > 0).sum()) > 0.1 * mean_voxels.get(info.class_name(value), 1.0):
                false_scores.append(score)
    return true_scores, false_scores


def match_rates(true_scores: Sequence[float], false_scores: Sequence[float], threshold: float | None) -> dict:
    """How a threshold sorts objects: the share of false objects (of a class the query lacks) it warns about, which
    should be high, and the share of true objects, which should be low; with the median scores of both."""

    def share(scores: Sequence[float]) -> float | None:
        return (
            round(float(np.mean(np.asarray(scores) < threshold)), 4) if len(scores) and threshold is not None else None
        )

    def median(scores: Sequence[float]) -> float | None:
        return round(float(np.median(scores)), 4) if len(scores) else None

    return {
        "threshold": threshold,
        "false_objects": len(false_scores),
        "false_objects_warned": share(false_scores),
        "false_objects_median_score": median(false_scores),
        "true_objects": len(true_scores),
        "true_objects_warned": share(true_scores),
        "true_objects_median_score": median(true_scores),
    }
