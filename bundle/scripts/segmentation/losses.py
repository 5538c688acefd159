"""Episodic segmentation losses for IRIS: one independent sigmoid channel per episode class, with padding.

An episode holds up to ``K`` classes; episodes with fewer classes are padded and flagged by ``class_valid``
(``B x K`` bool). Padded classes contribute nothing: their logits and targets are replaced by constants before
the loss is computed, so neither their values (finite or not) nor their gradients leak into the result, and the
gradient that reaches their logits is exactly zero. Every loss computes a value per ``(b, k)`` entry and returns the
(optionally class-weighted) mean over the valid entries.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.losses import FocalLoss as MonaiFocalLoss
from monai.losses import HausdorffDTLoss
from torch import nn

UNLABELLED_LOGIT = -100.0  # sigmoid 0 and target 0: no Dice, BCE, focal or false-positive contribution

__all__ = ["EpisodicLoss", "DiceTermLoss", "DiceBCELoss", "FocalLoss", "DiceFocalLoss", "LOSSES", "build_loss"]


class EpisodicLoss(nn.Module):
    """Base class: masks padded classes and reduces a per-``(b, k)`` loss to a scalar.

    Subclasses implement :meth:`per_entry`. Computation runs in float32 with autocast disabled, because Dice sums
    and BCE logarithms over whole volumes lose too much precision in bf16/fp16. Every valid entry weighs the same: an
    episode's class slots hold randomly drawn classes, so a weight per slot would mean nothing.
    """

    def per_entry(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Computes the loss of each ``(b, k)`` entry.

        Args:
            logits: float32 ``B x K x D x H x W`` (any number of spatial dims).
            target: float32 binary ``B x K x D x H x W``.

        Returns:
            ``B x K`` losses.
        """
        raise NotImplementedError

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        class_valid: torch.Tensor | None = None,
        unlabelled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Computes the loss of a batch of episodes.

        Args:
            logits: ``B x K x D x H x W`` raw scores (any number of spatial dims, any float dtype).
            target: binary ``B x K x D x H x W`` masks, same shape as ``logits``.
            class_valid: ``B x K`` bool, False for padded classes; ``None`` means every class is valid.
            unlabelled: ``B x 1 x D x H x W`` bool, True for voxels whose truth the episode does not know (structures
                of held-out classes): they count neither as foreground nor as background of any class, so the model
                is not taught to suppress what it will later be asked to segment. Their logits are replaced by a
                constant of zero loss and zero gradient (the voxel-mean terms still divide by every voxel).

        Returns:
            Scalar float32 loss: the mean over valid ``(b, k)`` entries; 0 (still attached to ``logits``' graph) when
            no entry is valid.
        """
        if logits.ndim < 3:
            raise ValueError(f"logits must be B x K x spatial..., got shape {tuple(logits.shape)}.")
        if target.shape != logits.shape:
            raise ValueError(f"target shape {tuple(target.shape)} differs from logits shape {tuple(logits.shape)}.")
        batch, classes = logits.shape[:2]
        if class_valid is None:
            class_valid = torch.ones(batch, classes, dtype=torch.bool, device=logits.device)
        elif class_valid.shape != (batch, classes):
            raise ValueError(f"class_valid must have shape {(batch, classes)}, got {tuple(class_valid.shape)}.")
        class_valid = class_valid.to(device=logits.device, dtype=torch.bool)

        with torch.autocast(device_type=logits.device.type, enabled=False):
            voxel_valid = class_valid.view(batch, classes, *([1] * (logits.ndim - 2)))
            logits = torch.where(voxel_valid, logits.float(), 0.0)
            target = torch.where(voxel_valid, target.float(), 0.0)
            if unlabelled is not None:
                unlabelled = unlabelled.to(device=logits.device, dtype=torch.bool)
                logits = torch.where(unlabelled, UNLABELLED_LOGIT, logits)
                target = torch.where(unlabelled, 0.0, target)
            weights = class_valid.float()
            loss = (self.per_entry(logits, target) * weights).sum()
            return loss / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)


def soft_dice(dice: DiceLoss, logits: torch.Tensor, target: torch.Tensor, empty_fraction: float) -> torch.Tensor:
    """``B x K`` soft Dice losses; an empty target's loss is its Dice with a smoothing of ``empty_fraction`` x voxels.

    A requested class absent from the query (an empty target) has a Dice of 0 for any prediction but an exactly empty
    one: a constant without gradient, so false positives on absent classes would cost only the voxel-wise term. With
    the smoothing ``tau`` in numerator and denominator its loss becomes ``sum(p) / (sum(p) + tau)``: a false object of
    ``tau`` voxels costs half a Dice, as a half-missed object does.
    """
    has_foreground = target.flatten(2).amax(dim=2) > 0  # B x K
    losses = dice(logits, target).flatten(1)  # MONAI keeps B x K x 1 x ... x 1 with reduction="none"
    predicted = torch.sigmoid(logits).flatten(2).sum(dim=2)  # B x K soft volumes
    tau = max(empty_fraction * logits[0, 0].numel(), 1.0)
    return torch.where(has_foreground, losses, predicted / (predicted + tau))


def _check_non_negative(**values: float) -> None:
    """Rejects negative loss-term weights, naming the offending argument."""
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")


class DiceTermLoss(EpisodicLoss):
    """Base of the losses with a soft Dice term (:func:`soft_dice`) and an optional surface term; subclasses add their
    voxel-wise term in :meth:`per_entry`.

    Args:
        dice_weight: weight of the Dice term, ``>= 0``.
        smooth_nr, smooth_dr: constants added to the Dice numerator and denominator.
        empty_fraction: smoothing of the Dice of an empty target, as a fraction of the patch's voxels (see
            :func:`soft_dice`); a false object of that size costs half a Dice.
        boundary_weight: weight of MONAI's ``HausdorffDTLoss`` (a distance-transform surface term), ``>= 0``;
            0 leaves it out (it computes distance transforms on the CPU every iteration).
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        empty_fraction: float = 0.01,
        boundary_weight: float = 0.0,
    ) -> None:
        super().__init__()
        _check_non_negative(dice_weight=dice_weight, empty_fraction=empty_fraction, boundary_weight=boundary_weight)
        self.dice_weight = float(dice_weight)
        self.boundary_weight = float(boundary_weight)
        self.empty_fraction = float(empty_fraction)
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=smooth_nr, smooth_dr=smooth_dr)
        self.boundary = HausdorffDTLoss(sigmoid=True, include_background=True, reduction="none")

    def dice_terms(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``B x K`` weighted Dice plus the weighted surface term (not computed when its weight is 0)."""
        loss = self.dice_weight * soft_dice(self.dice, logits, target, self.empty_fraction)
        if self.boundary_weight == 0:
            return loss
        return loss + self.boundary_weight * self.boundary(logits, target).flatten(1)


class DiceBCELoss(DiceTermLoss):
    """Soft Dice + binary cross-entropy, per class channel.

    Dice balances foreground against background for small structures; BCE gives a dense per-voxel gradient early in
    training when Dice is flat.

    Args:
        bce_weight: weight of the BCE term, ``>= 0``.
        dice_weight, smooth_nr, smooth_dr, empty_fraction, boundary_weight: see :class:`DiceTermLoss`.
    """

    def __init__(self, bce_weight: float = 1.0, **dice_options: float) -> None:
        super().__init__(**dice_options)
        _check_non_negative(bce_weight=bce_weight)
        self.bce_weight = float(bce_weight)

    def per_entry(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Returns ``B x K`` weighted Dice + voxel-mean BCE (+ boundary term)."""
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(dim=2)
        return self.dice_terms(logits, target) + self.bce_weight * bce


class FocalLoss(EpisodicLoss):
    """Sigmoid focal loss ``alpha_t * (1 - p_t)**gamma * BCE``, voxel-averaged per class channel.

    Down-weights the many easy background voxels. ``alpha_t`` is ``alpha`` where the target is 1 and ``1 - alpha``
    elsewhere. The voxel-wise value is MONAI's ``FocalLoss(use_softmax=False)``, which is exactly this formula.

    Args:
        alpha: weight of foreground voxels, in ``[0, 1]``.
        gamma: focusing exponent, ``>= 0`` (0 gives alpha-weighted BCE).
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        _check_non_negative(gamma=gamma)
        self.focal = MonaiFocalLoss(gamma=float(gamma), alpha=float(alpha), use_softmax=False, reduction="none")

    def per_entry(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Returns ``B x K`` voxel-mean focal losses."""
        return self.focal(logits, target).flatten(2).mean(dim=2)


class DiceFocalLoss(DiceTermLoss):
    """Soft Dice + sigmoid focal loss, per class channel; see :class:`DiceBCELoss` and :class:`FocalLoss`.

    Args:
        focal_weight: weight of the focal term, ``>= 0``.
        alpha: focal weight of foreground voxels, in ``[0, 1]``.
        gamma: focal focusing exponent, ``>= 0``.
        dice_weight, smooth_nr, smooth_dr, empty_fraction, boundary_weight: see :class:`DiceTermLoss`.
    """

    def __init__(self, focal_weight: float = 1.0, alpha: float = 0.25, gamma: float = 2.0, **dice_options: float):
        super().__init__(**dice_options)
        _check_non_negative(focal_weight=focal_weight)
        self.focal_weight = float(focal_weight)
        self.focal = FocalLoss(alpha=alpha, gamma=gamma)

    def per_entry(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Returns ``B x K`` weighted Dice + voxel-mean focal losses (+ boundary term)."""
        return self.dice_terms(logits, target) + self.focal_weight * self.focal.per_entry(logits, target)


LOSSES: dict[str, type[EpisodicLoss]] = {"dice_bce": DiceBCELoss, "focal": FocalLoss, "dice_focal": DiceFocalLoss}


def build_loss(name: str, empty_fraction: float = 0.01, boundary_weight: float = 0.0, **options: Any) -> nn.Module:
    """Builds a loss by the name used in the bundle configs.

    Args:
        name: one of ``"dice_bce"``, ``"focal"``, ``"dice_focal"``.
        empty_fraction: Dice smoothing of empty targets for the losses with a Dice term (``focal`` has none).
        boundary_weight: weight of the surface term of the losses with a Dice term (``focal`` takes none).
        options: keyword arguments of the chosen class.

    Returns:
        The loss module.

    Raises:
        ValueError: for an unknown ``name``.
    """
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid names are {sorted(LOSSES)}.")
    if name != "focal":
        options.update(empty_fraction=empty_fraction, boundary_weight=boundary_weight)
    elif boundary_weight:
        raise ValueError("loss_function#boundary_weight needs a loss with a Dice term: use dice_bce or dice_focal.")
    return LOSSES[name](**options)
