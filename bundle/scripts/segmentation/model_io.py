"""What a saved model records about itself, so that every command can use it without size or preprocessing flags.

:class:`~scripts.networks.IrisNet` keeps its settings as the module's extra state, so ``model.pt`` and the
``network`` entry of every training checkpoint carry them (JSON in a uint8 tensor, see
:mod:`scripts.networks.extra_state`; a plain dict in models of bundle 0.5.0-0.7.8), loaded with ``weights_only=True``::

    {
        "network": {"base_channels": 8, "channel_multipliers": [1, 4, 8, 16], ...},  # build_iris_net's arguments
        "patch_size": [32, 32, 32],
        "target_spacing": null,                                                    # or [1.5, 1.5, 1.5]
        "mirror_axes": [0, 1, 2],                              # windows mirrored at inference, as in validation
        "datasets": {"IrisDemo": {"modality": "CT", "labels": {"fluid_round": 1, ...}, "held_out": [...]}},
        "bundle_version": "0.5.0",
        "selection": {"metric": "val_seen_dice", "value": 0.66, "iteration": 3200},  # model.pt only
        "match": {"threshold": 0.62, ...},    # model.pt only: the match check's threshold (scripts.segmentation.match)
    }

The configs read them with :func:`read_model_settings` (with :data:`DEFAULT_SETTINGS` for what a model does not
record) and the loaders refuse, with one line, an explicit setting that contradicts the model
(:func:`check_requested`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader
from torch import nn

from ..data.pool import read_dataset_json
from ..data.transforms import normalisation, target_spacing_or_native
from ..distributed import unwrap
from ..errors import IrisInputError
from ..networks import extra_state

logger = logging.getLogger(__name__)

METADATA = Path(__file__).resolve().parents[2] / "configs" / "metadata.json"


# The demo model's settings: what inference and evaluation use where no model file says otherwise (the model zoo's
# shape checks without weights, models of bundle 0.4.0). The one table of them; metadata.json describes the same model.
DEFAULT_SETTINGS: dict[str, Any] = {
    "patch_size": [32, 32, 32],
    "target_spacing": None,
    "mirror_axes": [0, 1, 2],
    "in_channels": 1,
    "coordinate_channels": False,
    "base_channels": 8,
    "num_query_tokens": 8,
    "num_heads": 8,
    "decoder_depth": 2,
    "blocks_per_stage": 1,
    "channel_multipliers": [1, 4, 8, 16],
    "use_memory_bank": True,
    "memory_momentum": 0.9,
    "dataset_labels": {},
    "match_threshold": None,
}


class ModelSettingsError(IrisInputError):
    """A model file that cannot be read, or a setting that contradicts the model; the message names both."""


def bundle_version() -> str:
    return str(json.loads(METADATA.read_text())["version"])


def training_settings(
    dataset_files: Sequence[str],
    patch_size: Sequence[int],
    target_spacing: Sequence[float] | None,
    mirror_axes: Sequence[int] = (0, 1, 2),
) -> dict[str, Any]:
    """The settings a training run records in its models, besides the network's own hyper-parameters;
    ``mirror_axes``: the axes whose mirrored windows validation averaged (those training flipped), which inference
    uses too."""
    datasets = {}
    for path in dataset_files:
        info = read_dataset_json(Path(path))
        datasets[info.name] = {
            "modality": info.modality,
            "labels": {info.labels[value]: value for value in sorted(info.labels)},
            "held_out": [info.labels[value] for value in sorted(info.labels) if info.labels[value] in info.held_out],
        }
    return {
        "patch_size": [int(size) for size in patch_size],
        "target_spacing": target_spacing_or_native(target_spacing),
        "mirror_axes": [int(axis) for axis in mirror_axes],
        "datasets": datasets,
        "bundle_version": bundle_version(),
    }


def load_network_state(path: str | Path) -> dict[str, Any]:
    """The network state dict of ``model.pt`` or of a training checkpoint (its ``network`` entry)."""
    path = Path(path)
    if not path.is_file():
        raise ModelSettingsError(f"Model file {path} does not exist; train a model first or pass --ckpt_path.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: settings read cheaply
    except Exception as error:
        raise ModelSettingsError(f"Model file {path} cannot be read ({type(error).__name__}: {error}).") from error
    state = content.get("network", content) if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping) or not any(str(key).startswith("encoder.") for key in state):
        raise ModelSettingsError(f"{path} holds no network weights (expected model.pt or a checkpoint_*.pt).")
    return dict(state)


def with_settings(state: Mapping[str, Any], **settings: Any) -> dict[str, Any]:
    """A copy of the network state dict ``state`` whose recorded settings also hold ``settings`` (how ``model.pt``
    records its selection, averaging or match threshold)."""
    recorded = extra_state.decode(state.get("_extra_state"), {})
    return {**state, "_extra_state": extra_state.encode({**recorded, **settings})}


def read_model_settings(path: str | Path, with_defaults: bool = False) -> dict[str, Any]:
    """The settings ``path`` records, flat: the network's hyper-parameters, ``patch_size``, ``target_spacing``,
    ``modality`` (None when the model saw several), ``memory_classes``, ``datasets``, ``dataset_labels`` (global class
    name -> label value in its dataset), ``match_threshold``, ``bundle_version``.

    A missing file gives ``{}``; a model saved before settings were recorded gives only its memory classes, with a
    warning; ``with_defaults`` fills what is missing from :data:`DEFAULT_SETTINGS`, as the configs read them. The file
    is read once per version (a command asks for several settings).
    """
    path = Path(path)
    defaults = copy.deepcopy(DEFAULT_SETTINGS) if with_defaults else {}
    if not path.is_file():
        logger.info(f"No model at {path}: using the demo model's settings unless the command gives others.")
        return defaults
    stat = path.stat()
    return {**defaults, **copy.deepcopy(_read_settings(str(path), stat.st_mtime_ns, stat.st_size))}


@functools.lru_cache(maxsize=8)
def _read_settings(path: str, modified_ns: int, size: int) -> dict[str, Any]:
    state = load_network_state(path)
    saved = extra_state.decode(state.get("_extra_state"), {})
    settings: dict[str, Any] = {
        "memory_classes": list(extra_state.decode(state.get("memory_bank._extra_state"), {}).get("class_names", []))
    }
    if not saved:
        logger.warning(f"{path} records no settings (saved before bundle 0.5.0): using the settings of the configs.")
        return settings
    settings.update(saved.get("network", {}))
    for key in ("patch_size", "target_spacing", "mirror_axes", "datasets", "bundle_version", "selection", "match"):
        if key in saved:
            settings[key] = saved[key]
    if "match" in saved:
        settings["match_threshold"] = saved["match"].get("threshold")
    datasets = saved.get("datasets", {})
    settings["dataset_labels"] = {
        f"{name}/{label}": int(value)
        for name, dataset in datasets.items()
        for label, value in dataset.get("labels", {}).items()
    }
    modalities = sorted({str(dataset["modality"]) for dataset in datasets.values()}, key=str.upper)
    if modalities:
        settings["modalities"] = modalities
        one = len({normalisation(modality) for modality in modalities}) == 1
        settings["modality"] = modalities[0] if one else None
    return settings


def describe_modalities(modalities: Sequence[str]) -> str:
    """``CT (ct_window) and MRI (percentile)``: modality names with the normalisation each gets."""
    return " and ".join(f"{name} ({normalisation(name)})" for name in modalities)


def recorded_settings(path: str | Path) -> dict[str, Any]:
    """Everything the model at ``path`` records, as it records it (``{}`` without a model file): a network built
    with them states the same settings as the weights it loads, as MONAI's ``copy_model_state`` needs."""
    if not Path(path).is_file():
        return {}
    return extra_state.decode(load_network_state(path).get("_extra_state"), {})


def _same(saved: Any, requested: Any) -> bool:
    if isinstance(saved, str) or isinstance(requested, str):
        return str(saved).upper() == str(requested).upper()
    if isinstance(saved, Sequence) and isinstance(requested, Sequence):
        return len(saved) == len(requested) and all(_same(a, b) for a, b in zip(saved, requested))
    if isinstance(saved, (int, float)) and isinstance(requested, (int, float)):
        return math.isclose(float(saved), float(requested), rel_tol=1e-6)
    return saved == requested


def model_modality(path: str | Path, default: str = "CT") -> str:
    """The modality the model at ``path`` was trained on (``default`` when it records none); a model trained on
    modalities of several normalisations needs an explicit ``--modality``."""
    settings = read_model_settings(path)
    if "modality" not in settings:
        return default
    if settings["modality"] is None:
        raise ModelSettingsError(
            f"{path} was trained on {describe_modalities(settings['modalities'])} images: pass --modality with the "
            "modality of your images (any name of the same normalisation works, e.g. MR for MRI)."
        )
    return settings["modality"]


def model_memory_classes(path: str | Path) -> list[str]:
    """The memory-bank classes of the model at ``path``; without a model file, those of the model that the bundle's
    ``metadata.json`` describes (its output channels), which the model zoo's shape checks build."""
    if Path(path).is_file():
        return list(read_model_settings(path).get("memory_classes", []))
    channels = json.loads(METADATA.read_text())["network_data_format"]["outputs"]["pred"]["channel_def"]
    return [channels[key] for key in sorted(channels, key=int)]


def check_requested(path: str | Path, requested: Mapping[str, Any]) -> None:
    """Refuse settings that contradict what the model at ``path`` records, naming the file, the id and both values."""
    saved = read_model_settings(path)
    requested = dict(requested)
    if "target_spacing" in requested:
        requested["target_spacing"] = target_spacing_or_native(requested["target_spacing"])
    for key, value in requested.items():
        if key == "modality" and "modalities" in saved:
            if normalisation(value) not in {normalisation(name) for name in saved["modalities"]}:
                raise ModelSettingsError(
                    f"{path} was trained on {describe_modalities(saved['modalities'])} images, but --modality "
                    f"{json.dumps(value)} ({normalisation(value)}) normalises images otherwise: give one of those "
                    "modalities or another name of the same normalisation."
                )
            continue  # any name of a normalisation the model was trained with
        if key in saved and not _same(saved[key], value):
            raise ModelSettingsError(
                f"{path} was trained with {key} {json.dumps(saved[key])}, but {json.dumps(value)} was asked for: "
                f"use the model's {key} (inference and evaluation read it from the model unless an override sets it; "
                "fine-tuning must build the network the model was trained with)."
            )


def built_settings(network: nn.Module) -> dict[str, Any]:
    """The hyper-parameters ``network`` (an IrisNet, or a wrapper of one) was built with."""
    return dict(getattr(unwrap(network), "settings", {}).get("network", {}))


def load_model(network: nn.Module, path: str | Path, usage: Mapping[str, Any] | None = None) -> None:
    """Load the model at ``path`` (model.pt or a checkpoint) strictly into ``network``, after refusing a network size
    or a ``usage`` setting (patch size, spacing, modality) that contradicts the model's."""
    check_requested(path, {**built_settings(network), **(usage or {})})
    unwrap(network).load_state_dict(load_network_state(path))


class ModelLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for ``model.pt`` or a training checkpoint (its ``network`` entry), which first
    refuses settings that contradict the model's own (:func:`check_requested`).

    Args:
        load_path: the model file.
        network: the network to load into; the hyper-parameters it was built with are checked.
        usage: the other settings the command runs with (``patch_size``, ``target_spacing``, ``modality``).
        map_location: as ``torch.load``.
        keep_settings: keep the network's own settings rather than the model's, as training from a pretrained model
            does (its models then record the new run's data).

    An engine that runs again loads the file again only if it changed.
    """

    def __init__(
        self,
        load_path: str,
        network: nn.Module,
        usage: Mapping[str, Any] | None = None,
        map_location: Any = None,
        keep_settings: bool = False,
    ) -> None:
        super().__init__(load_path, {"network": network}, map_location=map_location)
        self.network = unwrap(network)
        self.usage = dict(usage or {})
        self.keep_settings = keep_settings
        self.loaded: tuple[int, int] | None = None  # (modification time, size) of the file version loaded

    def __call__(self, engine: Engine) -> None:
        stat = Path(self.load_path).stat() if Path(self.load_path).is_file() else None
        version = (stat.st_mtime_ns, stat.st_size) if stat else None
        if version is not None and version == self.loaded:
            return  # an engine run again (a server between requests) keeps the weights it loaded
        check_requested(self.load_path, {**built_settings(self.network), **self.usage})
        own = dict(getattr(self.network, "settings", {}))
        super().__call__(engine)
        self.loaded = version
        if self.keep_settings:
            self.network.settings = own
