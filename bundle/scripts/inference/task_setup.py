"""Prepare the task before inference: which classes, and their embeddings by the chosen strategy or from a file."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..distributed import unwrap
from ..errors import IrisInputError
from ..segmentation.inferers import InContextInferer
from ..segmentation.match import ReferenceMatch
from ..segmentation.support import SupportSetError, load_references
from ..segmentation.task_embeddings import encode_references
from ..segmentation.volume_calibration import ReferenceVolumeCalibration, check_lowest_threshold
from .strategies import TaskInputs, apply_strategy, get_strategy

logger = logging.getLogger(__name__)


class TuningProgress:
    """A progress bar and the support loss of in-context tuning, shown from its first step (if any)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.losses: list[float] = []
        self.bar: tqdm | None = None
        self.redirect = logging_redirect_tqdm()

    def __enter__(self) -> TuningProgress:
        self.redirect.__enter__()
        return self

    def __call__(self, step: int, loss: float) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.steps, desc="in-context tuning", leave=False)
        self.losses.append(loss)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update()

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()
        self.redirect.__exit__(*exc_info)
        if self.losses:
            logger.info(f"In-context tuning: support loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}")


def load_embeddings(path: str | Path) -> dict:
    """Read a task-embeddings file (tensors and plain types only, loaded with ``weights_only=True``)."""
    if not Path(path).is_file():
        raise SupportSetError(f"embeddings_file {path} does not exist: give support images to compute it.")
    content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or not {"classes", "embeddings"} <= set(content):
        raise SupportSetError(f"{path} is not a task-embeddings file (expected 'classes' and 'embeddings').")
    return content


def save_embeddings(
    path: str | Path,
    classes: Mapping[str, int],
    embeddings: torch.Tensor,
    strategy: str,
    reference_volumes: Sequence[float] = (),
) -> None:
    """Write class names, label values, embeddings (1 x K x T x C) and each class's mean volume (mm³) in the
    references, so that references need not be shared."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    content = {
        "classes": dict(classes),
        "embeddings": embeddings.detach().cpu(),
        "strategy": strategy,
        "reference_volumes": [float(volume) for volume in reference_volumes],
    }
    torch.save(content, path)


def resolve_classes(
    classes: Mapping[str, int] | Sequence[str] | None,
    strategy: str,
    embeddings_file: str | None = None,
    memory_classes: Sequence[str] = (),
    dataset_labels: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Class name -> output label value.

    ``classes`` maps names to values in the support labels; for ``memory`` it lists memory-bank class names, written
    with their label values in their datasets (``dataset_labels``, as the model records them) when those are known
    and distinct, else as 1..K. Without ``classes``, an existing ``embeddings_file`` provides them, and the ``memory``
    strategy takes every class of ``memory_classes`` (the bank of the bundle's weights); otherwise the result is empty
    and :class:`TaskSetupHandler` reports it when inference starts.
    """
    if not classes:
        if embeddings_file and Path(embeddings_file).is_file():
            return {str(k): int(v) for k, v in load_embeddings(embeddings_file)["classes"].items()}
        classes = list(memory_classes) if strategy == "memory" else []
    if not classes:
        return {}
    if isinstance(classes, Mapping):
        return {str(name): int(value) for name, value in classes.items()}
    if strategy != "memory":
        raise SupportSetError(f"'classes' must map names to label values for strategy '{strategy}', got a list.")
    known = dict(dataset_labels or {})
    values = [known.get(str(name)) for name in classes]
    if None not in values and len(set(values)) == len(values) and 0 not in values:
        return {str(name): int(value) for name, value in zip(classes, values)}
    return {str(name): index + 1 for index, name in enumerate(classes)}


class TaskSetupHandler:
    """At the start of inference (after the checkpoint is loaded), compute or load the task embeddings once: an
    engine run again (a server that swaps the query between runs) reuses them.

    Args:
        network: the IrisNet.
        inferer: the in-context inferer that receives the embeddings.
        strategy: ``one_shot``, ``ensemble``, ``retrieval``, ``tuning`` or ``memory``.
        classes: class name -> label value (see :func:`resolve_classes`).
        patch_size: training patch size; references are encoded as patches of this size.
        support_images, support_labels: reference volumes and label maps.
        modality, target_spacing: preprocessing of the references, as in training.
        embeddings_file: where to save the computed embeddings, or what to load when no support images are given.
        tuning_steps, tuning_lr: in-context tuning schedule.
        retrieval_top_k: references averaged per class by the retrieval strategy.
        in_channels: the network's image channels (RGB references are converted to match).
        coordinate_channels: whether the network takes the voxels' places as channels too, as in training.
        match_threshold: the model's match threshold (see :mod:`scripts.segmentation.match`): with references, every
            query's objects are scored against each class's first reference, and those below it get a warning.
        drop_warned: leave classes with a warning out of the label map.
        threshold_from_reference_volume: lower each class's threshold (to ``lowest_threshold`` at most) until its
            object reaches the class's mean volume in the references (see
            :mod:`scripts.segmentation.volume_calibration`).
        lowest_threshold: the floor of those thresholds.
        keep_largest_component: the label map keeps each class's largest object, so that is the one measured.
    """

    def __init__(
        self,
        network: nn.Module,
        inferer: InContextInferer,
        strategy: str,
        classes: Mapping[str, int],
        patch_size: Sequence[int],
        support_images: Sequence[str] = (),
        support_labels: Sequence[str] = (),
        modality: str = "CT",
        target_spacing: Sequence[float] | None = None,
        embeddings_file: str | None = None,
        tuning_steps: int = 20,
        tuning_lr: float = 1e-3,
        retrieval_top_k: int = 1,
        in_channels: int = 1,
        coordinate_channels: bool = False,
        match_threshold: float | None = None,
        drop_warned: bool = False,
        threshold_from_reference_volume: bool = False,
        lowest_threshold: float = 0.05,
        keep_largest_component: bool = False,
    ) -> None:
        self.network = network
        self.inferer = inferer
        self.strategy = strategy
        self.classes = dict(classes)
        self.patch_size = tuple(patch_size)
        self.support_images, self.support_labels = list(support_images), list(support_labels)
        self.modality, self.target_spacing = modality, target_spacing
        self.embeddings_file = embeddings_file
        self.tuning_steps, self.tuning_lr, self.retrieval_top_k = tuning_steps, tuning_lr, retrieval_top_k
        self.tuning_losses: list[float] = []
        self.in_channels, self.coordinate_channels = in_channels, coordinate_channels
        self.match_threshold, self.drop_warned = match_threshold, drop_warned
        self.threshold_from_reference_volume, self.lowest_threshold = threshold_from_reference_volume, lowest_threshold
        self.keep_largest_component = keep_largest_component
        self.done = False

    def check(self) -> None:
        """Reject an unusable task before any image is read."""
        strategy = get_strategy(self.strategy)
        if not isinstance(self.inferer, strategy.inferer):
            raise IrisInputError(
                f"Strategy '{self.strategy}' segments with a {strategy.inferer.__name__}, but the config's inferer is "
                f"a {type(self.inferer).__name__}: build it with scripts.inference.strategies.strategy_inferer."
            )
        if not self.classes:
            raise SupportSetError("Give 'classes' (name -> label value, or memory-bank names for strategy 'memory').")
        if self.threshold_from_reference_volume and not strategy.needs_references:
            raise SupportSetError(
                f"threshold_from_reference_volume needs references, which strategy '{self.strategy}' does not use."
            )
        if self.threshold_from_reference_volume:
            check_lowest_threshold(self.lowest_threshold)
        if not strategy.needs_references or self.support_images:
            return
        if not self.embeddings_file:
            raise SupportSetError(
                f"Strategy '{self.strategy}' needs support_images and support_labels, or an embeddings_file."
            )
        if strategy.per_query:
            raise SupportSetError(
                f"Strategy '{self.strategy}' chooses among references per query: give support images."
            )

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if self.done:
            return
        self.check()
        network = unwrap(self.network)
        strategy = get_strategy(self.strategy)
        if strategy.needs_references and not self.support_images:
            embeddings, volumes = self._loaded(network)
            self._calibrate(volumes)
            self.inferer.set_task(embeddings)
            self.done = True
            return
        names, volumes = list(self.classes), []
        task = TaskInputs(
            network,
            names,
            list(self.classes.values()),
            self.patch_size,
            tuning_steps=self.tuning_steps,
            tuning_lr=self.tuning_lr,
            retrieval_top_k=self.retrieval_top_k,
        )
        if strategy.needs_references:
            references = load_references(
                self.support_images,
                self.support_labels,
                self.classes,
                self.modality,
                self.target_spacing,
                self.in_channels,
                self.coordinate_channels,
            )
            task.references = [[ref for ref in references if value in ref.subject.classes] for value in task.values]
            task.per_reference, task.present = encode_references(
                network, task.references, task.values, self.patch_size
            )  # R x K x T x C
            first = [refs[0].patch(value, self.patch_size) for refs, value in zip(task.references, task.values)]
            images, masks = (torch.stack([pair[i] for pair in first]) for i in (0, 1))  # K x 1 x P each
            self.inferer.matcher = ReferenceMatch(
                network, images, masks.float(), self.patch_size, self.match_threshold, self.drop_warned
            )
            volumes = [
                float(np.mean([ref.volume(value) for ref in refs])) for refs, value in zip(task.references, task.values)
            ]
            self._calibrate(volumes)
        with TuningProgress(self.tuning_steps) as progress:
            task.on_tuning_step = progress
            embeddings = apply_strategy(self.strategy, task, self.inferer)
        self.tuning_losses = progress.losses
        if self.embeddings_file and strategy.needs_references:
            save_embeddings(self.embeddings_file, self.classes, embeddings, self.strategy, volumes)
            logger.info(f"Saved task embeddings of {names} to {self.embeddings_file}")
        self.done = True

    def _calibrate(self, volumes: Sequence[float]) -> None:
        """Set the inferer's reference-volume calibration, where it is asked for."""
        if not self.threshold_from_reference_volume:
            return
        if len(volumes) != len(self.classes):
            raise SupportSetError(
                f"{self.embeddings_file} holds no reference volumes (it was written before bundle 0.9.3): give the "
                "support images, or set --threshold_from_reference_volume False."
            )
        self.inferer.calibration = ReferenceVolumeCalibration(
            volumes, self.lowest_threshold, self.keep_largest_component
        )
        sizes = ", ".join(f"{name} {volume / 1000:.2f} mL" for name, volume in zip(self.classes, volumes))
        logger.info(f"Thresholds from the references' volumes: {sizes}")

    def _loaded(self, network: nn.Module) -> tuple[torch.Tensor, list[float]]:
        content = load_embeddings(self.embeddings_file)
        embeddings = content["embeddings"]
        expected = network.token_shape
        if embeddings.dim() != 4 or tuple(embeddings.shape[2:]) != expected:
            raise SupportSetError(
                f"{self.embeddings_file} holds embeddings of shape {tuple(embeddings.shape)}, but this network expects "
                f"1 x K x {expected[0]} x {expected[1]}: it was computed with a different network size."
            )
        stored = {str(k): int(v) for k, v in content["classes"].items()}
        if list(stored.items()) != list(self.classes.items()):  # the embeddings' channels follow the file's order
            raise SupportSetError(
                f"{self.embeddings_file} holds classes {stored}, but 'classes' asks for {self.classes} (the same "
                "names and values, in the same order)."
            )
        return embeddings.to(next(network.parameters()).device), list(content.get("reference_volumes", []))
