"""Optimizers used to train IRIS that are not part of PyTorch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["Lamb"]


class Lamb(torch.optim.Optimizer):
    """LAMB: Adam moments with a layer-wise trust ratio (You et al., ICLR 2020, Algorithm 2).

    The trust ratio ``||p|| / ||r||`` rescales each parameter tensor's Adam step to its own size, which keeps
    large-batch episodic training stable without a per-layer learning-rate search. For each parameter tensor
    ``p`` with gradient ``g`` at step ``t``::

        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        r = (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps) + weight_decay * p
        p = p - lr * trust * r,  trust = ||p|| / ||r||  (1.0 if either norm is 0)

    Weight decay is decoupled (added to ``r``, not to ``g``) and applies to every parameter of a group; pass
    parameter groups with ``weight_decay=0`` to exempt biases or normalisation weights. Parameters are expected in
    float32 (autocast keeps them so); the moments use the parameter's dtype and device.

    Args:
        params: parameters or parameter groups to optimise.
        lr: base learning rate.
        betas: decay rates ``(b1, b2)`` of the first and second moment estimates, each in ``[0, 1)``.
        eps: term added to the denominator for numerical stability, ``>= 0``.
        weight_decay: decoupled weight-decay coefficient, ``>= 0``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 1e-5,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0).")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0).")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas} (expected two values).")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta} (must be in [0, 1)).")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0).")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one optimisation step.

        Args:
            closure: re-evaluates the model and returns the loss; optional.

        Returns:
            The loss returned by ``closure``, or ``None``.

        Raises:
            RuntimeError: when a gradient is sparse, which LAMB's tensor norms do not support.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients; use a dense-gradient model.")

                state = self.state[param]
                if not state:
                    # ``step`` is a CPU tensor, as in torch.optim.Adam, so the state dict holds tensors only.
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = int(state["step"])

                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias_correction1 = 1.0 - beta1**step
                bias_correction2 = 1.0 - beta2**step

                denom = (exp_avg_sq / bias_correction2).sqrt_().add_(group["eps"])
                update = (exp_avg / bias_correction1).div_(denom)
                if group["weight_decay"] != 0.0:
                    update.add_(param, alpha=group["weight_decay"])

                # Kept on the device (no ``.item()``) so the step does not synchronise with the host.
                param_norm = torch.linalg.vector_norm(param)
                update_norm = torch.linalg.vector_norm(update)
                trust_ratio = torch.where(
                    (param_norm > 0) & (update_norm > 0), param_norm / update_norm, torch.ones_like(param_norm)
                )
                param.add_(update.mul_(trust_ratio), alpha=-group["lr"])

        return loss
