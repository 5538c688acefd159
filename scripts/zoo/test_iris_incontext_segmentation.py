"""MONAI model-zoo unit test of the IRIS bundle: train, evaluate and infer through ``ConfigWorkflow`` on tiny
generated volumes, with ``check_properties``, as ``ci/unit_tests/runner.py --b iris_incontext_segmentation`` runs it.

It lives in the IRIS repository as ``scripts/zoo/test_iris_incontext_segmentation.py``; ``scripts/pack_bundle.py``
lays it out as a zoo pull request (``ci/unit_tests/`` next to ``models/iris_incontext_segmentation``), and the
repository's own tests run it there. ``BUNDLE_ROOT`` may point elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow

BUNDLE_ROOT = Path(os.environ.get("BUNDLE_ROOT", "models/iris_incontext_segmentation")).resolve()
CONFIGS = BUNDLE_ROOT / "configs"
TINY = {
    "patch_size": [16, 16, 16],
    "target_spacing": "native",
    "base_channels": 4,
    "num_query_tokens": 2,
    "network_def#num_heads": 2,
    "network_def#channel_multipliers": [1, 2, 4, 8],
    "batch_size": 1,
    "total_iterations": 2,
    "warmup_iterations": 1,
    "eval_every": 2,
    "checkpoint_every": 2,
    "num_workers": 0,
    "cache_workers": 1,
    "sw_mirror_axes": [],
    "k_independence_cases": 0,
    "amp": False,
}


def make_dataset(root: Path, subjects: int = 6) -> Path:
    """Volumes of 24³ voxels with a bright sphere (class 1) and a dark box (class 2) at jittered places; 4 training,
    2 validation subjects; ``held_out_labels``: none."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(24)] * 3, indexing="ij"))
    items = []
    for index in range(subjects):
        image = rng.normal(0.0, 10.0, (24, 24, 24)).astype(np.float32)
        label = np.zeros((24, 24, 24), dtype=np.uint8)
        centre = 8 + rng.integers(-2, 3, size=3)
        label[((grid - centre[:, None, None, None]) ** 2).sum(0) <= 16] = 1
        corner = 13 + rng.integers(-2, 3, size=3)
        label[tuple(slice(c, c + 6) for c in corner)] = 2
        image[label == 1] += 200.0
        image[label == 2] -= 150.0
        for kind, array in (("images", image), ("labels", label)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, np.eye(4)), root / kind / f"case{index}.nii.gz")
        items.append({"image": f"images/case{index}.nii.gz", "label": f"labels/case{index}.nii.gz"})
    dataset = {
        "name": "ZooTest",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "sphere", "2": "box"},
        "training": items[:4],
        "validation": items[4:],
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=4))
    return root / "dataset.json"


def check_workflow(workflow: ConfigWorkflow) -> None:
    """Initialise, check the bundle properties of the workflow type, run, finalise."""
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise ValueError(f"missing bundle properties: {missing}")
    workflow.run()
    workflow.finalize()


def test_order(first: str, second: str) -> int:
    """Train first, then evaluate and infer with the trained model (the zoo runner sorts by this)."""
    order = {"test_train": 0, "test_evaluate": 1, "test_infer": 2}
    return order[first] - order[second]


class TestIrisInContextSegmentation(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.work = Path(tempfile.mkdtemp())
        cls.dataset = make_dataset(cls.work / "data")
        cls.models, cls.logs = cls.work / "models", cls.work / "logs"
        if str(BUNDLE_ROOT) not in sys.path:
            sys.path.insert(1, str(BUNDLE_ROOT))  # as ConfigWorkflow.run does, for properties checked before run

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.work)

    def workflow(self, configs: list[str], workflow_type: str, **overrides) -> ConfigWorkflow:
        return ConfigWorkflow(
            config_file=[str(CONFIGS / name) for name in configs],
            meta_file=str(CONFIGS / "metadata.json"),
            logging_file=str(CONFIGS / "logging.conf"),
            workflow_type=workflow_type,
            bundle_root=str(BUNDLE_ROOT),
            **overrides,
        )

    def train_overrides(self) -> dict:
        return {
            **TINY,
            "dataset_dir": str(self.dataset.parent),
            "ckpt_dir": str(self.models),
            "output_dir": str(self.logs),
            "train#pool#cache_dir": str(self.work / "cache"),
        }

    def test_train(self) -> None:
        check_workflow(self.workflow(["train.json"], "train", run_id="training", **self.train_overrides()))
        self.assertTrue((self.models / "model.pt").is_file())
        summary = json.loads((self.logs / "training_summary.json").read_text())
        self.assertEqual(summary["iterations"], 2)

    def test_evaluate(self) -> None:
        overrides = {**self.train_overrides(), "output_dir": str(self.work / "eval"), "eval_shots": [1],
                     "eval_strategies": ["one_shot"], "eval_draws": 1}  # fmt: skip
        workflow = self.workflow(["train.json", "evaluate.json"], "eval", run_id="evaluating", **overrides)
        check_workflow(workflow)
        metrics = json.loads((self.work / "eval" / "metrics.json").read_text())
        self.assertIn("one_shot", metrics["seen"])

    def test_infer(self) -> None:
        data = self.dataset.parent
        overrides = {
            "ckpt_path": str(self.models / "model.pt"),
            "dataset_dir": str(data),
            "output_dir": str(self.work / "infer"),
            "query_images": [str(data / "images/case4.nii.gz"), str(data / "images/case5.nii.gz")],
            "support_images": [str(data / "images/case0.nii.gz")],
            "support_labels": [str(data / "labels/case0.nii.gz")],
            "classes": {"sphere": 1, "box": 2},
            "sw_mirror_axes": [],
        }
        check_workflow(self.workflow(["inference.json"], "infer", **overrides))
        written = sorted(path.name for path in (self.work / "infer").glob("*_seg.nii.gz"))
        self.assertEqual(written, ["case4_seg.nii.gz", "case5_seg.nii.gz"])
        shape = nib.load(self.work / "infer" / "case4_seg.nii.gz").shape
        self.assertEqual(shape, (24, 24, 24))


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.TextTestRunner(verbosity=2).run(loader.loadTestsFromTestCase(TestIrisInContextSegmentation))
