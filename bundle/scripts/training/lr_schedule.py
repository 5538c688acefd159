"""Learning-rate schedule of IRIS training: linear warm-up, then step decay, counted in iterations.

One ``LambdaLR`` rather than torch's ``SequentialLR(LinearLR, StepLR)``: the chain gives warm-up then step decay, but
not the optional cool-down multiplied onto the step decay, and checkpoints of earlier runs hold a ``LambdaLR`` state.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupStepDecay", "warmup_step_decay"]


class WarmupStepDecay:
    """Multiplier of the base learning rate at a given training iteration.

    A callable object rather than a closure so that it pickles, and so that ``LambdaLR.state_dict()`` stores its
    plain ``__dict__`` (ints and a float), which loads with ``torch.load(..., weights_only=True)``.

    - Warm-up, ``iteration < warmup_iterations``: ``(iteration + 1) / (warmup_iterations + 1)``; never 0, so the
      first step already moves the weights.
    - Afterwards: ``lr_decay_gamma ** ((iteration - warmup_iterations) // decay_interval)``; exactly 1.0 at
      ``iteration == warmup_iterations``.
    - Cool-down, the last ``cooldown_iterations`` of ``total_iterations``: the step decay times
      ``(total_iterations - iteration) / cooldown_iterations``, a linear fall from the step decay's value to
      ``1 / cooldown_iterations`` of it at the last iteration, so that training ends at a low learning rate.

    Args:
        warmup_iterations: number of warm-up iterations, ``>= 0`` (0 disables warm-up).
        lr_decay_gamma: factor applied every ``decay_interval`` iterations after warm-up, in ``(0, 1]``.
        decay_interval: iterations between two decays, ``> 0``.
        cooldown_iterations: length of the final linear cool-down, ``>= 0`` (0, the default, disables it).
        total_iterations: the run's length; needed when ``cooldown_iterations > 0``.
    """

    def __init__(
        self,
        warmup_iterations: int,
        lr_decay_gamma: float,
        decay_interval: int,
        cooldown_iterations: int = 0,
        total_iterations: int | None = None,
    ) -> None:
        if warmup_iterations < 0:
            raise ValueError(f"warmup_iterations must be >= 0, got {warmup_iterations}.")
        if not 0.0 < lr_decay_gamma <= 1.0:
            raise ValueError(f"lr_scheduler#lr_decay_gamma must be in (0, 1], got {lr_decay_gamma}.")
        if decay_interval <= 0:
            raise ValueError(f"lr_scheduler#decay_interval must be > 0, got {decay_interval}.")
        if cooldown_iterations < 0:
            raise ValueError(f"cooldown_iterations must be >= 0, got {cooldown_iterations}.")
        if cooldown_iterations and (
            total_iterations is None or not warmup_iterations <= total_iterations - cooldown_iterations
        ):
            raise ValueError(
                f"The learning-rate cool-down ({cooldown_iterations} iterations) must fit between the warm-up "
                f"({warmup_iterations}) and the end of training (total_iterations {total_iterations})."
            )
        self.cooldown_iterations = int(cooldown_iterations)
        self.total_iterations = None if total_iterations is None else int(total_iterations)
        self.warmup_iterations = int(warmup_iterations)
        self.lr_decay_gamma = float(lr_decay_gamma)
        self.decay_interval = int(decay_interval)

    def __call__(self, iteration: int) -> float:
        """Returns the learning-rate multiplier for the 0-based ``iteration``."""
        if iteration < self.warmup_iterations:
            return (iteration + 1) / (self.warmup_iterations + 1)
        multiplier = self.lr_decay_gamma ** ((iteration - self.warmup_iterations) // self.decay_interval)
        if self.cooldown_iterations and iteration >= self.total_iterations - self.cooldown_iterations:
            multiplier *= max(self.total_iterations - iteration, 1) / self.cooldown_iterations
        return multiplier

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(warmup_iterations={self.warmup_iterations}, "
            f"lr_decay_gamma={self.lr_decay_gamma}, decay_interval={self.decay_interval}, "
            f"cooldown_iterations={self.cooldown_iterations}, total_iterations={self.total_iterations})"
        )


def warmup_step_decay(
    optimizer: torch.optim.Optimizer,
    warmup_iterations: int,
    lr_decay_gamma: float,
    decay_interval: int,
    cooldown_fraction: float = 0.0,
    total_iterations: int | None = None,
) -> LambdaLR:
    """Builds the IRIS schedule as a ``LambdaLR`` to be stepped once per training iteration.

    Meant for MONAI's ``LrScheduleHandler(epoch_level=False)``; the multiplier for iteration ``i`` is
    :class:`WarmupStepDecay` ``(i)``, applied to every parameter group's initial learning rate.

    Args:
        optimizer: optimizer whose learning rates are scheduled.
        warmup_iterations: number of warm-up iterations, ``>= 0``.
        lr_decay_gamma: decay factor in ``(0, 1]``.
        decay_interval: iterations between two decays after warm-up, ``> 0``.
        cooldown_fraction: share of ``total_iterations``, in ``[0, 1)``, spent in the final linear cool-down
            (rounded to whole iterations), so that a shorter run (fine-tuning) keeps the same shape.
        total_iterations: the run's length, for the cool-down.

    Returns:
        The scheduler; its ``state_dict()`` holds plain Python types only.
    """
    if not 0.0 <= cooldown_fraction < 1.0:
        raise ValueError(f"lr_scheduler#cooldown_fraction must be in [0, 1), got {cooldown_fraction}.")
    if cooldown_fraction and total_iterations is None:
        raise ValueError("lr_scheduler#cooldown_fraction needs total_iterations, the run's length.")
    cooldown_iterations = round(cooldown_fraction * total_iterations) if cooldown_fraction else 0
    schedule = WarmupStepDecay(warmup_iterations, lr_decay_gamma, decay_interval, cooldown_iterations, total_iterations)
    return LambdaLR(optimizer, lr_lambda=schedule)
