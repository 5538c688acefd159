"""Crash-safe training checkpoints: atomic writes, pruning, and automatic resume of the same command.

A checkpoint holds the network (with its memory bank and its recorded settings), optimizer, LR schedule, trainer
progress, early-stopping state, the best model's score, RNG states, the latest metrics and a timestamp; only tensors
and plain types, so it loads with ``torch.load(weights_only=True)``. Episodes are pure functions of
``(seed, index)``, so restoring the episode offset is enough to continue the exact episode sequence.

Why not MONAI's ``CheckpointSaver``/``CheckpointLoader`` (ignite's ``Checkpoint``): they save and load objects with a
``state_dict``, but do not restore the RNG states and the episode position that exact resume needs, nor fall back to
an older checkpoint when the newest is truncated; writes are atomic here as with ignite's ``DiskSaver(atomic=True)``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import EarlyStopHandler
from torch import nn

from ..atomic import atomic_save
from ..data.episodes import EpisodeDataset
from ..distributed import is_main_process, unwrap, world_size
from ..errors import IrisInputError
from ..segmentation.model_io import with_settings

logger = logging.getLogger(__name__)
PREFIX = "checkpoint_"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain types."""
    version, keys, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["keys"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableEarlyStopHandler(EarlyStopHandler):
    """MONAI's ``EarlyStopHandler`` whose patience counter and best score a checkpoint can save and restore: MONAI
    keeps ignite's ``EarlyStopping``, which has them as its ``state_dict``, only as a private attribute."""

    def state_dict(self) -> dict[str, Any]:
        """Ignite's state in plain types (empty before ``set_trainer``)."""
        if self._handler is None:
            return {}
        state = dict(self._handler.state_dict())
        best = state["best_score"]
        return {**state, "counter": int(state["counter"]), "best_score": None if best is None else float(best)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._handler is not None and state:
            self._handler.load_state_dict({**self._handler.state_dict(), **state})  # 0.8.0 saved two of its keys


def periodic_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """The periodic checkpoints ``checkpoint_<iteration>.pt`` of ``ckpt_dir``, oldest first (zero-padded names)."""
    return sorted(Path(ckpt_dir).glob(f"{PREFIX}*.pt"))


class CheckpointManager:
    """Save a full training checkpoint every ``save_every`` iterations and resume from the newest valid one.

    Attach after the validation handler: a checkpoint then records the validation of its own iteration.

    On ``STARTED`` the newest checkpoint in ``ckpt_dir`` that loads is restored (a truncated or corrupted file is
    reported and skipped); a log line gives its path and iteration. A checkpoint that loads but does not fit the
    network (another size, or an older layout) stops the run with an error naming it. ``resume=False`` starts afresh.

    Args:
        ckpt_dir: folder of ``checkpoint_<iteration>.pt`` files.
        network, optimizer, lr_scheduler: the training objects.
        dataset: the episode dataset, told where to continue.
        save_every: checkpoint interval in iterations.
        keep: periodic checkpoints kept (older ones are deleted; the best model ``model.pt`` is separate).
        resume: continue from the newest checkpoint when there is one.
        early_stopping: its patience counter and best score are saved too.
        metrics_engine: engine whose ``state.metrics`` are recorded (the evaluator).
        best_model: the best-model saver, whose best score is saved and restored with the checkpoint.
    """

    def __init__(
        self,
        ckpt_dir: str,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        dataset: EpisodeDataset,
        save_every: int,
        keep: int = 3,
        resume: bool = True,
        early_stopping: ResumableEarlyStopHandler | None = None,
        metrics_engine: Engine | None = None,
        best_model: BestModelSaver | None = None,
    ) -> None:
        if save_every < 1 or keep < 1:
            raise ValueError(f"checkpoint_every and checkpoints_to_keep must be >= 1, got {save_every} and {keep}.")
        self.ckpt_dir = Path(ckpt_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.dataset = dataset
        self.save_every, self.keep, self.resume = save_every, keep, resume
        self.early_stopping = early_stopping
        self.metrics_engine = metrics_engine
        self.best_model = best_model

    def attach(self, engine: Engine) -> None:
        if self.best_model is not None:
            self.best_model.trainer = engine
        engine.add_event_handler(Events.STARTED, self.restore)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_every), self.save)

    def checkpoints(self) -> list[Path]:
        """Periodic checkpoints, newest first."""
        return periodic_checkpoints(self.ckpt_dir)[::-1]

    def save(self, engine: Engine) -> None:
        if not is_main_process():
            return
        metrics = self.metrics_engine.state.metrics if self.metrics_engine is not None else {}
        content = {
            "network": unwrap(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "trainer": {"iteration": engine.state.iteration},
            "early_stopping": self.early_stopping.state_dict() if self.early_stopping is not None else {},
            "rng": rng_state(),
            "metrics": {name: float(value) for name, value in metrics.items()},
            "best_model": self.best_model.state_dict() if self.best_model is not None else {},
            "timestamp": datetime.now(timezone.utc).isoformat(),
        }
        atomic_save(content, self.ckpt_dir / f"{PREFIX}{engine.state.iteration:08d}.pt")
        for old in self.checkpoints()[self.keep :]:
            old.unlink(missing_ok=True)

    def restore(self, engine: Engine) -> None:
        if not self.resume:
            return
        for path in self.checkpoints():
            try:
                content = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # truncated or corrupted file: say so and fall back to the previous one
                logger.warning(
                    f"Checkpoint {path} cannot be loaded ({type(error).__name__}: {error}); trying an older one."
                )
                continue
            try:
                self._load(engine, content)
            except (RuntimeError, KeyError) as error:  # e.g. another network size, or a layout of an older version
                raise IrisInputError(
                    f"Checkpoint {path} does not fit this training run ({type(error).__name__}: {error}). "
                    "Point ckpt_dir elsewhere, or pass --resume False to start afresh."
                ) from error
            logger.info(f"Resuming training from {path} at iteration {engine.state.iteration}.")
            return

    def _load(self, engine: Engine, content: dict[str, Any]) -> None:
        unwrap(self.network).load_state_dict(content["network"])
        self.optimizer.load_state_dict(content["optimizer"])
        self.lr_scheduler.load_state_dict(content["lr_scheduler"])
        iteration = int(content["trainer"]["iteration"])
        engine.state.iteration = iteration
        engine.state.epoch = 0  # one epoch of total_iterations: ignite continues it from ``iteration``
        batch_size = getattr(engine.data_loader, "batch_size", 1) or 1
        self.dataset.start = iteration * batch_size * world_size()
        if self.early_stopping is not None:
            self.early_stopping.load_state_dict(content.get("early_stopping") or {})
        if self.best_model is not None:
            self.best_model.load_state_dict(content.get("best_model") or {})
        set_rng_state(content["rng"])


class BestModelSaver:
    """Write the network (with its memory bank) to ``model.pt`` atomically whenever the key metric improves.

    Attached to the evaluator; the file is what inference and the model zoo load. Its settings record the selection
    (metric, value and training iteration). The best score is part of the training checkpoints
    (:class:`CheckpointManager` saves and restores it), so a resumed run never replaces a better ``model.pt``.
    Not MONAI's ``CheckpointSaver(save_key_metric=True)``: it cannot record the selection in the model's settings,
    and its best score would need a second state to restore on resume.

    Args:
        path: output file, usually ``ckpt_dir/model.pt``.
        network: the trained IrisNet (or its DDP wrapper).
        metric: name of the evaluator metric to maximise.
    """

    def __init__(self, path: str, network: nn.Module, metric: str) -> None:
        self.path = Path(path)
        self.network = network
        self.metric = metric
        self.best = float("-inf")
        self.best_iteration = 0
        self.trainer: Engine | None = None  # set by CheckpointManager.attach, for the iteration of the selection

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.best, "iteration": self.best_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric") == self.metric:
            self.best, self.best_iteration = float(state["value"]), int(state["iteration"])

    def __call__(self, engine: Engine) -> None:
        score = float(engine.state.metrics[self.metric])
        if not score > self.best:
            return
        self.best = score
        self.best_iteration = self.trainer.state.iteration if self.trainer is not None else 0
        if is_main_process():
            atomic_save(with_settings(unwrap(self.network).state_dict(), selection=self.state_dict()), self.path)
            logger.info(
                f"Saved the best model so far ({self.metric} {score:.4f} at iteration {self.best_iteration}) "
                f"to {self.path}."
            )
