"""Run the IRIS bundle's own configs (inference.json, train.json) from the app, with the app's settings as overrides.

The app does not re-implement the bundle: every request runs the same ConfigWorkflow that
``python -m monai.bundle run`` runs, so MONAI Label and the command line give the same results.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_BUNDLE_ROOT = REPO_ROOT / "bundle"
FINETUNED_NAME = "model_finetuned.pt"

# Settings a user may pass as ``--conf <key> <value>``; they override the bundle config ids of the same name.
BUNDLE_SETTINGS = (
    "in_channels",
    "base_channels",
    "num_query_tokens",
    "num_heads",
    "decoder_depth",
    "channel_multipliers",
    "patch_size",
    "target_spacing",
    "modality",
    "sw_batch_size",
    "sw_overlap",
    "sw_mirror_axes",
    "keep_largest_component",
    "threshold_from_reference_volume",
    "lowest_threshold",
)


def parse_setting(value: str) -> Any:
    """A ``--conf`` value as JSON when it is JSON (numbers, lists, null), else the plain string (``CT``)."""
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return value


def train_json_ids(ids: dict[str, Any]) -> dict[str, Any]:
    """``ids`` as train.json names them: the network-size ids that inference.json has at its top level are
    ``network_def#...`` there (see the bundle's ``scripts/moved_ids.py``)."""
    from scripts.moved_ids import MOVED_IDS

    return {MOVED_IDS.get(key, key): value for key, value in ids.items()}


@dataclass
class IrisSettings:
    """Where the bundle and the weights are, and the bundle ids the app overrides.

    The network size, patch size, spacing and modality come from the weights themselves (see the bundle's
    ``scripts/segmentation/model_io.py``); ``--conf`` values that contradict them are refused.

    Args:
        bundle_root: the IRIS bundle folder.
        checkpoint: the weights given with ``--conf checkpoint`` (else the bundle's ``models/model.pt``).
        model_dir: where fine-tuning writes its runs and ``model_finetuned.pt``.
        overrides: bundle config ids from ``--conf`` (network size, patch size, modality, ...).
        pin_checkpoint: always use ``checkpoint``, even when ``/train`` wrote newer fine-tuned weights.
    """

    bundle_root: Path
    checkpoint: Path
    model_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    pin_checkpoint: bool = False

    @classmethod
    def from_conf(cls, app_dir: str, conf: dict[str, str]) -> IrisSettings:
        bundle_root = Path(conf.get("bundle_root", DEFAULT_BUNDLE_ROOT)).resolve()
        checkpoint = Path(conf.get("checkpoint", bundle_root / "models" / "model.pt")).resolve()
        model_dir = Path(conf.get("model_dir", Path(app_dir) / "model")).resolve()
        overrides = {key: parse_setting(conf[key]) for key in BUNDLE_SETTINGS if key in conf}
        pin = str(conf.get("pin_checkpoint", "false")).lower()
        if pin not in ("true", "false"):
            raise ValueError(f"--conf pin_checkpoint takes true or false, got {conf['pin_checkpoint']!r}.")
        if str(bundle_root) not in sys.path:
            sys.path.insert(0, str(bundle_root))  # the bundle's ``scripts`` package, as MONAI puts it after initialize
        return cls(bundle_root, checkpoint, model_dir, overrides, pin_checkpoint=pin == "true")

    @property
    def finetuned(self) -> Path:
        return self.model_dir / FINETUNED_NAME

    def active_checkpoint(self) -> Path:
        """The fine-tuned weights of ``/train`` when they are newer than the checkpoint (unless it is pinned), else the
        checkpoint: after a restart, the server goes on with the weights it last fine-tuned."""
        if self.pin_checkpoint or not self.finetuned.is_file():
            return self.checkpoint
        if self.checkpoint.is_file() and self.checkpoint.stat().st_mtime >= self.finetuned.stat().st_mtime:
            return self.checkpoint
        return self.finetuned

    def describe_weights(self) -> str:
        """Which weights the app uses and why, for the start-up log and ``info()``."""
        active = self.active_checkpoint()
        if active == self.finetuned:
            written = time.strftime("%Y-%m-%d %H:%M", time.localtime(active.stat().st_mtime))
            return (
                f"weights: fine-tuned by /train ({active}, {written}), newer than {self.checkpoint}; "
                "--conf pin_checkpoint true uses the checkpoint"
            )
        if self.finetuned.is_file():
            reason = "pinned" if self.pin_checkpoint else "newer than the fine-tuned weights"
            return f"weights: {active} ({reason}; {self.finetuned} is not used)"
        return f"weights: {active}"

    def model_settings(self) -> dict[str, Any]:
        """What the active weights record about themselves (network size, patch size, classes, ...)."""
        from scripts.segmentation.model_io import read_model_settings

        return read_model_settings(self.active_checkpoint())

    def memory_classes(self) -> list[str]:
        """Class names in the memory bank of the active weights (read without building the network)."""
        return list(self.model_settings().get("memory_classes", []))

    def training_ids(self) -> dict[str, Any]:
        """Ids that fine-tuning must share with the active weights, from what they record (as inference.json names
        them; :meth:`workflow` gives train.json its names)."""
        saved = self.model_settings()
        keys = (*BUNDLE_SETTINGS, "use_memory_bank", "memory_momentum")
        # --conf values stay the user's (and are refused when they contradict the weights); training reads the
        # modality of each dataset from its dataset.json
        ids = {key: saved[key] for key in keys if key in saved and key not in self.overrides and key != "modality"}
        if "mirror_axes" in saved:  # flip only where the weights were flipped (not left/right anatomy)
            ids["augmentation#flip_axes"] = saved["mirror_axes"]
        return ids

    def workflow(self, config: str | list[str], workflow_type: str, **overrides: Any) -> Any:
        """An initialised bundle workflow with the app's overrides (``overrides`` win)."""
        from monai.bundle import ConfigWorkflow

        configs = [config] if isinstance(config, str) else config
        settings = {**self.overrides, **overrides}
        if "train.json" in configs:
            settings = train_json_ids(settings)
        workflow = ConfigWorkflow(
            config_file=[str(self.bundle_root / "configs" / name) for name in configs],
            meta_file=str(self.bundle_root / "configs" / "metadata.json"),
            logging_file=False,  # keep the server's logging as it is
            workflow_type=workflow_type,
            bundle_root=str(self.bundle_root),
            device=torch.device("cuda:0" if torch.cuda.is_available() else "cpu"),
            **settings,
        )
        workflow.initialize()
        return workflow

    def run(self, config: str | list[str], workflow_type: str, **overrides: Any) -> Any:
        """Initialise, run and finalise a bundle workflow; returns the workflow (its parser holds the components)."""
        workflow = self.workflow(config, workflow_type, **overrides)
        try:
            workflow.run()
        finally:
            workflow.finalize()
        return workflow
