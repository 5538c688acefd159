"""Tests of the episodic segmentation losses: padding masks, reference formulas, weights and precision."""

from __future__ import annotations

import pytest
import torch
from monai.losses import HausdorffDTLoss
from torch import nn

from scripts.errors import IrisInputError
from scripts.segmentation.losses import DiceBCELoss, DiceFocalLoss, EpisodicLoss, FocalLoss, build_loss
from scripts.training.handlers import LossWeightSchedule

VALID = torch.tensor([[True, True, False], [True, False, False]])  # B=2, K=3, three padded slots


def _episode(seed: int = 0, shape: tuple[int, ...] = (2, 3, 3, 4, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator) * 2
    target = (torch.rand(shape, generator=generator) > 0.6).float()
    return logits, target


def _all_losses() -> list[EpisodicLoss]:
    return [DiceBCELoss(), FocalLoss(), DiceFocalLoss(), DiceBCELoss(boundary_weight=0.5)]


def _ref_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss of every (b, k) entry, B x K, with MONAI's default smoothing."""
    prob = torch.sigmoid(logits.double()).flatten(2)
    target = target.double().flatten(2)
    return 1 - (2 * (prob * target).sum(-1) + 1e-5) / (prob.sum(-1) + target.sum(-1) + 1e-5)


def _ref_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Voxel-mean BCE of every (b, k) entry, B x K, written out from the sigmoid."""
    prob = torch.sigmoid(logits.double()).flatten(2)
    target = target.double().flatten(2)
    return -(target * torch.log(prob) + (1 - target) * torch.log(1 - prob)).mean(-1)


def _ref_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Voxel-mean alpha_t * (1 - p_t)**gamma * BCE of every (b, k) entry, B x K."""
    prob = torch.sigmoid(logits.double()).flatten(2)
    target = target.double().flatten(2)
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * -torch.log(p_t)).mean(-1)


def _masked_mean(per_entry: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return per_entry[valid].mean()


@pytest.mark.parametrize("loss_fn", _all_losses(), ids=lambda m: type(m).__name__)
def test_padded_classes_are_ignored(loss_fn: EpisodicLoss) -> None:
    logits, target = _episode()
    logits.requires_grad_(True)
    loss = loss_fn(logits, target, VALID)
    loss.backward()
    grad = logits.grad.clone()

    other_logits, other_target = logits.detach().clone(), target.clone()
    other_logits[~VALID] = torch.randn_like(other_logits[~VALID]) * 100
    other_logits[1, 2, 0, 0, 0] = float("nan")
    other_logits[0, 2, 0, 0, 0] = float("inf")
    other_target[~VALID] = 1 - other_target[~VALID]
    other_logits.requires_grad_(True)
    other_loss = loss_fn(other_logits, other_target, VALID)
    other_loss.backward()

    assert torch.equal(other_loss, loss)
    assert torch.equal(other_logits.grad[VALID], grad[VALID])
    assert torch.count_nonzero(grad[~VALID]) == 0 and torch.count_nonzero(other_logits.grad[~VALID]) == 0
    assert torch.count_nonzero(grad[VALID]) > 0


@pytest.mark.parametrize("loss_fn", _all_losses(), ids=lambda m: type(m).__name__)
def test_masked_loss_is_mean_over_valid_entries(loss_fn: EpisodicLoss) -> None:
    logits, target = _episode(seed=1)
    singles = [loss_fn(logits[b, k][None, None], target[b, k][None, None]) for b, k in VALID.nonzero().tolist()]
    torch.testing.assert_close(loss_fn(logits, target, VALID), torch.stack(singles).mean())


def test_none_means_all_valid() -> None:
    logits, target = _episode(seed=2)
    loss_fn = DiceBCELoss()
    torch.testing.assert_close(loss_fn(logits, target), loss_fn(logits, target, torch.ones(2, 3, dtype=torch.bool)))


def test_dice_bce_matches_formula() -> None:
    logits, target = _episode(seed=3)
    loss = DiceBCELoss(dice_weight=0.7, bce_weight=1.3)(logits, target, VALID)
    expected = _masked_mean(0.7 * _ref_dice(logits, target) + 1.3 * _ref_bce(logits, target), VALID)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.6, 0.0), (0.5, 1.5)])
def test_focal_matches_formula(alpha: float, gamma: float) -> None:
    logits, target = _episode(seed=4)
    loss = FocalLoss(alpha=alpha, gamma=gamma)(logits, target, VALID)
    expected = _masked_mean(_ref_focal(logits, target, alpha, gamma), VALID)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_dice_focal_matches_formula() -> None:
    logits, target = _episode(seed=5)
    loss = DiceFocalLoss(dice_weight=0.5, focal_weight=2.0, alpha=0.3, gamma=1.0)(logits, target, VALID)
    expected = _masked_mean(0.5 * _ref_dice(logits, target) + 2.0 * _ref_focal(logits, target, 0.3, 1.0), VALID)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_fn", [DiceBCELoss(bce_weight=0.0), DiceFocalLoss(focal_weight=0.0)])
def test_perfect_prediction_has_near_zero_dice(loss_fn: EpisodicLoss) -> None:
    _, target = _episode(seed=6)
    target[0, 1] = 0.0  # an empty mask predicted empty is also perfect
    logits = (target * 2 - 1) * 30
    assert loss_fn(logits, target, VALID).item() < 1e-5
    assert DiceBCELoss(bce_weight=0.0)(-logits, target, VALID).item() > 0.9


@pytest.mark.parametrize("loss_fn", _all_losses(), ids=lambda m: type(m).__name__)
def test_all_invalid_batch_returns_zero_with_grad(loss_fn: EpisodicLoss) -> None:
    logits, target = _episode(seed=8)
    logits.requires_grad_(True)
    loss = loss_fn(logits, target, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.ndim == 0 and loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("loss_fn", _all_losses(), ids=lambda m: type(m).__name__)
def test_float32_under_bf16_autocast(loss_fn: EpisodicLoss) -> None:
    torch.manual_seed(9)
    conv = nn.Conv3d(1, 3, kernel_size=3, padding=1)
    image = torch.randn(2, 1, 4, 5, 6)
    _, target = _episode(seed=9, shape=(2, 3, 4, 5, 6))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = conv(image)
        loss = loss_fn(logits, target, VALID)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, loss_fn(logits.detach().float(), target, VALID))
    loss.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_works_with_2d_spatial_inputs() -> None:
    logits, target = _episode(seed=10, shape=(2, 3, 6, 7))
    expected = _masked_mean(_ref_focal(logits, target), VALID)
    torch.testing.assert_close(FocalLoss()(logits, target, VALID).double(), expected, rtol=1e-5, atol=1e-7)


def test_shape_checks() -> None:
    logits, target = _episode()
    with pytest.raises(ValueError, match="target shape"):
        DiceBCELoss()(logits, target[:, :2])
    with pytest.raises(ValueError, match="class_valid"):
        DiceBCELoss()(logits, target, VALID[:, :2])


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: DiceBCELoss(dice_weight=-1.0), "dice_weight"),
        (lambda: DiceFocalLoss(focal_weight=-0.5), "focal_weight"),
        (lambda: FocalLoss(alpha=1.5), "alpha"),
        (lambda: FocalLoss(gamma=-2.0), "gamma"),
    ],
)
def test_invalid_arguments_raise(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_build_loss() -> None:
    assert isinstance(build_loss("dice_bce"), DiceBCELoss)
    assert isinstance(build_loss("dice_focal"), DiceFocalLoss)
    assert build_loss("dice_bce", empty_fraction=0.05).empty_fraction == 0.05  # the config's empty_target_smoothing
    assert build_loss("dice_focal", empty_fraction=0.0).empty_fraction == 0.0
    focal = build_loss("focal", alpha=0.4, gamma=1.0)
    assert isinstance(focal, FocalLoss) and (focal.focal.alpha, focal.focal.gamma) == (0.4, 1.0)
    with pytest.raises(ValueError, match="dice_bce.*dice_focal.*focal"):
        build_loss("dice_ce")


def test_boundary_term_is_monai_hausdorff_dt_loss_per_class() -> None:
    logits, target = _episode(shape=(2, 3, 8, 8, 8))
    plain, with_boundary = DiceBCELoss(), DiceBCELoss(boundary_weight=0.5)
    surface = HausdorffDTLoss(sigmoid=True, include_background=True, reduction="none")(logits, target).flatten(1)
    expected = plain.per_entry(logits, target) + 0.5 * surface
    torch.testing.assert_close(with_boundary.per_entry(logits, target), expected)
    with pytest.raises(ValueError, match="loss_function#boundary_weight needs a loss with a Dice term"):
        build_loss("focal", boundary_weight=1.0)


def test_loss_weight_schedule_moves_the_weights_linearly() -> None:
    loss = build_loss("dice_bce")
    schedule = LossWeightSchedule(loss, {"dice": [0.3, 0.7], "bce": [0.7, 0.3]}, total_iterations=101)
    assert schedule.weights(1) == pytest.approx({"dice": 0.3, "bce": 0.7})
    assert schedule.weights(51) == pytest.approx({"dice": 0.5, "bce": 0.5})
    assert schedule.weights(101) == schedule.weights(500) == pytest.approx({"dice": 0.7, "bce": 0.3})
    with pytest.raises(IrisInputError, match=r"names \['focal'\].*terms are \['bce', 'boundary', 'dice'\]"):
        LossWeightSchedule(loss, {"focal": [1, 0]}, total_iterations=10)
