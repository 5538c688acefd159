"""Checkpoint averaging: the mean of the network weights of the last periodic checkpoints, a model that often
generalises better than any one of them (as stochastic weight averaging), saved as ``model_averaged.pt``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from ..atomic import atomic_save
from ..errors import IrisInputError
from ..segmentation.model_io import load_network_state, with_settings
from .checkpoints import periodic_checkpoints

logger = logging.getLogger(__name__)
AVERAGED_MODEL = "model_averaged.pt"


def average_checkpoints(paths: Sequence[str | Path], output: str | Path) -> dict:
    """Average the ``network`` weights of training checkpoints (or plain state dicts) and save them atomically.

    Floating-point tensors are averaged. Everything else (integer buffers such as the memory bank's counts, the
    settings) comes from the newest checkpoint, the last of ``paths``; so does a tensor whose shape changed between
    checkpoints (the memory bank grows when new classes arrive). The settings record which checkpoints were averaged.

    Returns:
        the averaged state dict, loadable like ``model.pt``.
    """
    if not paths:
        raise IrisInputError("No checkpoint to average: train with checkpoint_every set, or pass checkpoint files.")
    states = [load_network_state(path) for path in paths]
    averaged = {}
    for name, value in states[-1].items():
        same = [state[name] for state in states if name in state and _same_shape(state[name], value)]
        if isinstance(value, torch.Tensor) and value.is_floating_point() and len(same) == len(states):
            averaged[name] = torch.stack([tensor.float() for tensor in same]).mean(0).to(value.dtype)
        else:
            averaged[name] = value
    if "_extra_state" in averaged:
        averaged = with_settings(averaged, selection={"averaged": [str(p) for p in paths]})
    atomic_save(averaged, output)
    return averaged


def _same_shape(tensor: object, reference: object) -> bool:
    return isinstance(tensor, torch.Tensor) and isinstance(reference, torch.Tensor) and tensor.shape == reference.shape


class CheckpointAveraging:
    """At the end of training, average the newest ``last`` periodic checkpoints of ``ckpt_dir`` into
    ``model_averaged.pt`` (``last`` 0 turns it off; it must not exceed the checkpoints kept)."""

    def __init__(self, ckpt_dir: str, last: int, keep: int) -> None:
        if last < 0 or last > keep:
            raise IrisInputError(
                f"train#handler#checkpoint_averaging#last must be between 0 and checkpoints_to_keep ({keep}), "
                f"got {last}."
            )
        self.ckpt_dir = Path(ckpt_dir)
        self.last = last

    def attach(self, engine: Engine) -> None:
        if self.last:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        paths = periodic_checkpoints(self.ckpt_dir)[-self.last :]
        if len(paths) < self.last:  # a warning, not an error: the run is over, and the handlers after this one write
            logger.warning(
                f"train#handler#checkpoint_averaging#last is {self.last}, but {self.ckpt_dir} holds {len(paths)} "
                "periodic checkpoints (checkpoint_every is larger than the run?)"
                + (": nothing averaged." if not paths else f": averaging those {len(paths)}.")
            )
            if not paths:
                return
        output = self.ckpt_dir / AVERAGED_MODEL
        average_checkpoints(paths, output)
        logger.info(f"Averaged the weights of {', '.join(path.name for path in paths)} into {output}.")
