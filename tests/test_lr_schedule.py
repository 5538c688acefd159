"""Tests of the warm-up + step-decay (+ optional linear cool-down) learning-rate schedule."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

from scripts.training.lr_schedule import WarmupStepDecay, warmup_step_decay


def test_multiplier_values() -> None:
    schedule = WarmupStepDecay(warmup_iterations=10, lr_decay_gamma=0.98, decay_interval=500)
    assert schedule(0) == pytest.approx(1 / 11)
    assert schedule(5) == pytest.approx(6 / 11)
    assert schedule(9) == pytest.approx(10 / 11)
    assert schedule(10) == 1.0
    assert schedule(509) == 1.0
    assert schedule(510) == pytest.approx(0.98)
    assert schedule(1009) == pytest.approx(0.98)
    assert schedule(1010) == pytest.approx(0.98**2)


def test_without_warmup_starts_at_base_lr() -> None:
    schedule = WarmupStepDecay(warmup_iterations=0, lr_decay_gamma=0.5, decay_interval=2)
    assert [schedule(i) for i in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_pickles() -> None:
    schedule = pickle.loads(pickle.dumps(WarmupStepDecay(3, 0.9, 7)))
    assert (schedule.warmup_iterations, schedule.lr_decay_gamma, schedule.decay_interval) == (3, 0.9, 7)
    assert schedule(3 + 7) == pytest.approx(0.9)


@pytest.mark.parametrize(
    "args, message",
    [
        ((-1, 0.98, 500), "warmup_iterations.*-1"),
        ((10, 0.0, 500), "lr_decay_gamma.*0.0"),
        ((10, 1.5, 500), "lr_decay_gamma.*1.5"),
        ((10, 0.98, 0), "decay_interval.*got 0"),
        ((10, 0.9, -5), "decay_interval.*-5"),
    ],
)
def test_invalid_arguments_raise(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WarmupStepDecay(*args)


def test_cooldown_falls_linearly_from_the_step_decay_to_the_last_iteration() -> None:
    schedule = WarmupStepDecay(2, 0.5, 4, cooldown_iterations=4, total_iterations=12)
    plain = WarmupStepDecay(2, 0.5, 4)
    assert [schedule(i) for i in range(8)] == [plain(i) for i in range(8)]
    assert [schedule(i) for i in range(8, 12)] == pytest.approx([0.5 * 4 / 4, 0.5 * 3 / 4, 0.25 * 2 / 4, 0.25 / 4])
    assert min(schedule(i) for i in range(12)) > 0


@pytest.mark.parametrize(
    "cooldown, total, message",
    [
        (-1, 100, "cooldown_iterations must be >= 0, got -1"),
        (10, None, r"cool-down \(10 iterations\).*total_iterations None"),
        (95, 100, r"cool-down \(95 iterations\).*warm-up \(10\).*total_iterations 100"),
    ],
)
def test_cooldown_that_does_not_fit_the_run_raises(cooldown: int, total: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WarmupStepDecay(10, 0.98, 50, cooldown_iterations=cooldown, total_iterations=total)


def _sgd(lr: float = 0.1) -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=lr)


def test_lambda_lr_follows_multiplier_per_iteration() -> None:
    optimizer = _sgd()
    scheduler = warmup_step_decay(optimizer, warmup_iterations=4, lr_decay_gamma=0.5, decay_interval=3)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.1 * m for m in (0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25)]
    assert seen == pytest.approx(expected)
    assert seen[0] > 0


def test_state_dict_loads_with_weights_only() -> None:
    optimizer = _sgd()
    scheduler = warmup_step_decay(optimizer, warmup_iterations=4, lr_decay_gamma=0.5, decay_interval=3)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["lr_lambdas"] == [
        {
            "warmup_iterations": 4,
            "lr_decay_gamma": 0.5,
            "decay_interval": 3,
            "cooldown_iterations": 0,
            "total_iterations": None,
        }
    ]

    restored_optimizer = _sgd()
    restored = warmup_step_decay(restored_optimizer, warmup_iterations=1, lr_decay_gamma=0.9, decay_interval=100)
    restored.load_state_dict(state)
    assert restored.lr_lambdas[0].decay_interval == 3
    for opt, sched in ((optimizer, scheduler), (restored_optimizer, restored)):
        opt.step()
        sched.step()
    assert restored.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert restored.get_last_lr() == pytest.approx([0.05])


def test_cooldown_fraction_scales_with_the_run() -> None:
    for total in (12, 400):
        scheduler = warmup_step_decay(_sgd(), 2, 1.0, 100, cooldown_fraction=0.25, total_iterations=total)
        assert scheduler.lr_lambdas[0].cooldown_iterations == total // 4
        assert scheduler.lr_lambdas[0](total - 1) == pytest.approx(1 / (total // 4))
    with pytest.raises(ValueError, match="lr_scheduler#cooldown_fraction must be in \\[0, 1\\), got 1.0"):
        warmup_step_decay(_sgd(), 2, 1.0, 100, cooldown_fraction=1.0, total_iterations=12)
    with pytest.raises(ValueError, match="lr_scheduler#cooldown_fraction needs total_iterations"):
        warmup_step_decay(_sgd(), 2, 1.0, 100, cooldown_fraction=0.25)
