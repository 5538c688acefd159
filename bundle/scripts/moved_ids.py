"""Refuse the training ids that bundle 0.9.4 moved into the component that reads them.

MONAI's command line adds an unknown id as a new, unread entry, so ``--synthetic_class_prob 0.25`` after the move
would train with the default and say nothing. Giving a moved id, on the command line or at the top level of a config
file it names, stops the run before any data is read and names the id to write instead.
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import IrisInputError

MOVED_IDS = {
    "num_heads": "network_def#num_heads",
    "decoder_depth": "network_def#decoder_depth",
    "memory_momentum": "network_def#memory_momentum",
    "channel_multipliers": "network_def#channel_multipliers",
    "data_pool_weights": "train#dataset#dataset_weights",
    "max_classes_per_episode": "train#dataset#max_classes",
    "random_class_drop_prob": "train#dataset#random_class_drop_prob",
    "query_noise_std": "train#dataset#query_noise_std",
    "query_crop": "train#dataset#query_crop",
    "curriculum_iterations": "train#dataset#curriculum_iterations",
    "held_out_voxels": "train#dataset#held_out_voxels",
    "absent_class_choice": "train#dataset#absent_class_choice",
    "synthetic_class_prob": "train#dataset#synthetic_class_prob",
    "derived_class_prob": "train#dataset#derived_class_prob",
    "min_class_voxels": "train#pool#min_class_voxels",
    "cache": "train#pool#cache",
    "cache_dir": "train#pool#cache_dir",
    "lr_decay_gamma": "lr_scheduler#lr_decay_gamma",
    "decay_interval": "lr_scheduler#decay_interval",
    "lr_cooldown_fraction": "lr_scheduler#cooldown_fraction",
    "betas": "optimizer#betas",
    "epsilon": "optimizer#eps",
    "gradient_clip_norm": "train#trainer#gradient_clip_norm",
    "empty_target_smoothing": "loss_function#empty_fraction",
    "boundary_loss_weight": "loss_function#boundary_weight",
    "loss_weight_schedule": "train#handler#loss_weight_schedule#schedule",
    "average_last_checkpoints": "train#handler#checkpoint_averaging#last",
    "unfreeze_encoder_after": "train#handler#encoder_freeze#unfreeze_after",
    "early_stopping_patience": "validate#early_stopping#patience",
    "early_stopping_min_delta": "validate#early_stopping#min_delta",
}


def refuse_moved_ids(argv: Sequence[str] | None = None) -> None:
    """Raise :class:`IrisInputError` when ``argv`` (default: ``sys.argv``, ``monai.bundle run``'s) or a config file it
    names gives a moved id."""
    argv = sys.argv if argv is None else argv
    found = [(name, "--", "on the command line") for name in _option_names(argv) if name in MOVED_IDS]
    for path in _config_files(argv):
        found += [(key, '"', f"in {path}") for key in _top_level_keys(path) if key in MOVED_IDS]
    if found:
        fixes = "; ".join(
            f"{_written(old, style)} {where} is now {_written(MOVED_IDS[old], style)}" for old, style, where in found
        )
        raise IrisInputError(f"Bundle 0.9.4 moved these ids into the component that reads them: {fixes}.")


def _written(config_id: str, style: str) -> str:
    return f"--{config_id}" if style == "--" else f'"{config_id}"'


def _option_names(argv: Sequence[str]) -> list[str]:
    return [token[2:].split("=", 1)[0] for token in argv if token.startswith("--")]


def _config_files(argv: Sequence[str]) -> list[Path]:
    """The JSON files of ``--config_file`` (a path or a list of paths, as MONAI reads it)."""
    values = [value for option, value in zip(argv, argv[1:]) if option == "--config_file"]
    values += [token.split("=", 1)[1] for token in argv if token.startswith("--config_file=")]
    files: list[Path] = []
    for value in values:
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        names = [parsed] if isinstance(parsed, str) else list(parsed)
        files += [Path(name) for name in names if str(name).endswith(".json") and Path(name).is_file()]
    return files


def _top_level_keys(path: Path) -> list[str]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # MONAI reports a file it cannot read
    return list(content) if isinstance(content, dict) else []
