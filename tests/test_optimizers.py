"""Tests of the LAMB optimizer against a step-by-step reference computation."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from scripts.training.optimizers import Lamb

LR, BETA1, BETA2, EPS, WD = 0.1, 0.9, 0.999, 1e-6, 0.1


def _reference_steps(param: torch.Tensor, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Applies Algorithm 2 of You et al. (2020) by hand, in float64; returns the parameter after each step."""
    p = param.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    history = []
    for t, grad in enumerate(grads, start=1):
        g = grad.double()
        m = BETA1 * m + (1 - BETA1) * g
        v = BETA2 * v + (1 - BETA2) * g * g
        m_hat = m / (1 - BETA1**t)
        v_hat = v / (1 - BETA2**t)
        r = m_hat / (torch.sqrt(v_hat) + EPS) + WD * p
        p_norm = torch.sqrt((p * p).sum())
        r_norm = torch.sqrt((r * r).sum())
        trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else torch.tensor(1.0, dtype=torch.float64)
        p = p - LR * trust * r
        history.append(p.clone())
    return history


def _run_lamb(param: torch.Tensor, grads: list[torch.Tensor], **kwargs: float) -> tuple[nn.Parameter, Lamb]:
    weight = nn.Parameter(param.clone())
    optimizer = Lamb([weight], **kwargs)
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    return weight, optimizer


def test_defaults() -> None:
    group = Lamb([nn.Parameter(torch.ones(2))]).param_groups[0]
    assert group["lr"] == 2e-3 and group["betas"] == (0.9, 0.999)
    assert group["eps"] == 1e-6 and group["weight_decay"] == 1e-5


def test_first_and_second_step_match_reference() -> None:
    param = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    grads = [torch.tensor([[0.3, -0.2], [0.1, 0.4]]), torch.tensor([[-0.1, 0.5], [0.2, -0.3]])]
    expected = _reference_steps(param, grads)
    for steps in (1, 2):
        weight, _ = _run_lamb(param, grads[:steps], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD)
        torch.testing.assert_close(weight.detach().double(), expected[steps - 1], rtol=1e-6, atol=1e-6)


def test_first_step_closed_form() -> None:
    # With bias correction, step 1 gives m_hat = g and v_hat = g**2, so r = g / (|g| + eps) + wd * p.
    param = torch.tensor([3.0, -4.0])
    grad = torch.tensor([0.5, 0.5])
    weight, _ = _run_lamb(param, [grad], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD)
    r = grad / (grad.abs() + EPS) + WD * param  # [1.3, 0.6]
    trust = param.norm() / r.norm()  # 5 / sqrt(2.05)
    torch.testing.assert_close(weight.detach(), param - LR * trust * r)


def test_zero_norm_parameter_uses_unit_trust_ratio() -> None:
    param = torch.zeros(3)
    grad = torch.tensor([0.2, -0.5, 0.0])
    weight, _ = _run_lamb(param, [grad], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD)
    torch.testing.assert_close(weight.detach(), -LR * grad / (grad.abs() + EPS))


def test_zero_update_leaves_parameter_unchanged() -> None:
    param = torch.tensor([1.0, 2.0])
    weight, _ = _run_lamb(param, [torch.zeros(2)], lr=LR, weight_decay=0.0)
    assert torch.equal(weight.detach(), param)


def test_parameters_without_grad_are_skipped() -> None:
    used, unused = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = Lamb([used, unused])
    used.grad = torch.ones(2)
    optimizer.step()
    assert unused not in optimizer.state and torch.equal(unused.detach(), torch.ones(2))


def test_closure_loss_is_returned() -> None:
    weight = nn.Parameter(torch.tensor([1.0, -1.0]))
    optimizer = Lamb([weight], lr=LR)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (weight**2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == pytest.approx(2.0)
    assert weight.abs().sum().item() < 2.0


def test_state_dict_round_trip_with_weights_only() -> None:
    torch.manual_seed(0)
    param = torch.randn(4, 3)
    grads = [torch.randn(4, 3) for _ in range(3)]
    weight, optimizer = _run_lamb(param, grads[:2], lr=LR, weight_decay=WD)
    state = optimizer.state_dict()["state"][0]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and int(state["step"]) == 2

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    restored_weight = nn.Parameter(weight.detach().clone())
    restored = Lamb([restored_weight], lr=LR, weight_decay=WD)
    restored.load_state_dict(loaded)
    for opt, w in ((optimizer, weight), (restored, restored_weight)):
        w.grad = grads[2].clone()
        opt.step()
    assert torch.equal(restored_weight.detach(), weight.detach())
    assert int(restored.state[restored_weight]["step"]) == 3


def test_sparse_gradients_are_rejected() -> None:
    embedding = nn.Embedding(5, 2, sparse=True)
    optimizer = Lamb(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


def test_training_under_bf16_autocast_keeps_fp32_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = Lamb(model.parameters(), lr=1e-2)
    inputs, targets = torch.randn(16, 4), torch.randn(16, 1)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(inputs).float(), targets)
        loss.backward()
        optimizer.step()
    for old, new in zip(before, model.parameters()):
        assert new.dtype == torch.float32 and torch.isfinite(new).all() and not torch.equal(old, new)


@pytest.mark.parametrize(
    "kwargs, bad_value",
    [
        ({"lr": -1.0}, "-1.0"),
        ({"betas": (1.0, 0.999)}, "1.0"),
        ({"betas": (0.9, -0.5)}, "-0.5"),
        ({"eps": -1e-3}, "-0.001"),
        ({"weight_decay": -0.25}, "-0.25"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, bad_value: str) -> None:
    with pytest.raises(ValueError, match=bad_value):
        Lamb([nn.Parameter(torch.ones(1))], **kwargs)
