"""Fine-tuning a trained model: keep its encoder fixed while the task encoder and decoder adapt to new classes."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn

from ..distributed import unwrap
from ..errors import IrisInputError

logger = logging.getLogger(__name__)


class EncoderFreeze:
    """Freeze the network's image encoder, for the whole run or for its first ``unfreeze_after`` iterations.

    After each backward pass the encoder's gradients are dropped (set to None), so the optimizer neither steps nor
    decays those weights and gradient clipping ignores them. The parameters keep ``requires_grad``: DDP registers its
    gradient hooks when it wraps the network, and a parameter frozen that way could not be unfrozen later.

    Args:
        network: the trained network (DDP-wrapped or not).
        unfreeze_after: iterations after which the encoder trains again; None keeps it frozen throughout.
    """

    def __init__(self, network: nn.Module, unfreeze_after: int | None = None) -> None:
        if unfreeze_after is not None and unfreeze_after < 0:
            raise IrisInputError(
                f"train#handler#encoder_freeze#unfreeze_after must be >= 0 or null, got {unfreeze_after}."
            )
        self.encoder = unwrap(network).encoder
        self.unfreeze_after = unfreeze_after

    def frozen(self, iteration: int) -> bool:
        """Whether the encoder is frozen at (1-based) ``iteration``."""
        return self.unfreeze_after is None or iteration <= self.unfreeze_after

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.announce)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.drop_gradients)

    def announce(self, engine: Engine) -> None:
        if self.unfreeze_after is None:
            logger.info("The encoder is frozen for the whole run (freeze_encoder).")
        elif self.frozen(engine.state.iteration + 1):
            logger.info(
                f"The encoder is frozen until iteration {self.unfreeze_after} "
                "(train#handler#encoder_freeze#unfreeze_after)."
            )

    def drop_gradients(self, engine: Engine) -> None:
        if not self.frozen(engine.state.iteration):
            if engine.state.iteration == self.unfreeze_after + 1:
                logger.info(f"The encoder trains from iteration {engine.state.iteration} on.")
            return
        for parameter in self.encoder.parameters():
            parameter.grad = None
