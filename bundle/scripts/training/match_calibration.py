"""When training ends, choose the match threshold of :mod:`scripts.segmentation.match` on training data and record it
in ``model.pt``."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ignite.engine import Engine, Events
from torch import nn

from ..atomic import atomic_save, atomic_write_text
from ..data.pool import DatasetPool
from ..distributed import is_main_process, unwrap
from ..segmentation.match import choose_threshold, match_rates, object_scores
from ..segmentation.model_io import load_network_state, with_settings

logger = logging.getLogger(__name__)


class MatchCalibration:
    """When training ends, choose the match threshold on training data with the weights of ``model.pt``
    (:func:`object_scores` of training subjects with references from other training subjects, then
    :func:`choose_threshold`), record it in ``model.pt``'s settings (``match``), where inference reads it, and add to
    ``validation_report.json`` what it does there and on the validation subjects (references from training subjects).

    Args:
        network: the trained network (or its DDP wrapper); a copy gets the weights of ``model.pt``.
        train_pool, validation_pool: the pools of training.
        inferer: the validation's sliding-window inferer.
        path: ``model.pt``.
        report: ``validation_report.json`` (attach after the handler that writes it).
        patch_size: the training patch size.
        subjects: subjects segmented per pool.
    """

    def __init__(
        self,
        network: nn.Module,
        train_pool: DatasetPool,
        validation_pool: DatasetPool,
        inferer: Callable,
        path: str,
        report: str,
        patch_size: Sequence[int],
        subjects: int = 8,
    ) -> None:
        self.network, self.inferer = network, inferer
        self.train_pool, self.validation_pool = train_pool, validation_pool
        self.path, self.report = Path(path), Path(report)
        self.patch_size, self.subjects = tuple(patch_size), subjects

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process() or not self.path.is_file():
            return
        state = load_network_state(self.path)
        network = copy.deepcopy(unwrap(self.network)).eval()
        network.load_state_dict(state)
        start = time.perf_counter()
        match = choose_threshold(*object_scores(network, self.train_pool, self.train_pool, self.inferer,
                                                self.patch_size, self.subjects))  # fmt: skip
        atomic_save(with_settings(state, match=match), self.path)
        validation = object_scores(network, self.validation_pool, self.train_pool, self.inferer, self.patch_size,
                                   self.subjects)  # fmt: skip
        if self.report.is_file():
            report = json.loads(self.report.read_text())
            report["match"] = {"training": match, "validation": match_rates(*validation, match["threshold"])}
            atomic_write_text(json.dumps(report, indent=4), self.report)
        if match["threshold"] is None:
            logger.warning(
                f"No match threshold: the model found no object of a requested structure in {self.subjects} training "
                f"subjects, so inference with {self.path} will not warn about segments that match nothing."
            )
            return
        logger.info(
            f"Match threshold {match['threshold']:.3f}, chosen on {match['true_objects']} objects of requested "
            f"structures and {match['false_objects']} false objects in training subjects (warned: "
            f"{match['true_objects_warned']} and {match['false_objects_warned']} of them), "
            f"{time.perf_counter() - start:.1f} s; recorded in {self.path}."
        )
