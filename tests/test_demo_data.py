"""Tests of the synthetic demo data set: determinism, dataset.json content, geometry, class coverage and the CLI."""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data import demo_data
from scripts.data.demo_data import CLASS_NAMES, HELD_OUT_LABELS, STRUCTURES, ensure_demo_data, make_demo_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num_training": 4, "num_validation": 1, "num_test": 1, "shape": (32, 32, 32)}


def _arrays(dataset_json: Path) -> list[np.ndarray]:
    """Every image and label array of a data set, in dataset.json order."""
    dataset = json.loads(dataset_json.read_text())
    items = dataset["training"] + dataset["validation"] + dataset["test"]
    return [np.asarray(nib.load(dataset_json.parent / item[key]).dataobj) for item in items for key in item]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=0, **SMALL)


def test_same_seed_same_arrays_other_seed_differs(small_set: Path, tmp_path: Path) -> None:
    again = _arrays(make_demo_dataset(tmp_path / "again", seed=0, **SMALL))
    reference = _arrays(small_set)
    assert all(a.dtype == b.dtype and a.tobytes() == b.tobytes() for a, b in zip(reference, again))
    other = _arrays(make_demo_dataset(tmp_path / "other", seed=1, **SMALL))
    assert any(a.tobytes() != b.tobytes() for a, b in zip(reference, other))


def test_dataset_json(small_set: Path) -> None:
    dataset = json.loads(small_set.read_text())
    assert dataset["name"] == "IrisDemo"
    assert dataset["modality"] == {"0": "CT"}
    assert dataset["tensorImageSize"] == "3D"
    assert dataset["labels"] == {"0": "background", **{str(k + 1): name for k, name in enumerate(CLASS_NAMES)}}
    assert len(CLASS_NAMES) >= 12
    assert dataset["held_out_labels"] == list(HELD_OUT_LABELS) and len(HELD_OUT_LABELS) == 3
    assert set(dataset["held_out_labels"]) <= set(dataset["labels"].values()) - {"background"}
    assert (dataset["numTraining"], dataset["numValidation"], dataset["numTest"]) == (4, 1, 1)
    assert (len(dataset["training"]), len(dataset["validation"]), len(dataset["test"])) == (4, 1, 1)
    for item in dataset["training"] + dataset["validation"] + dataset["test"]:
        assert set(item) == {"image", "label"}
        for path in item.values():
            assert not Path(path).is_absolute() and (small_set.parent / path).is_file()


def test_geometry_and_values(small_set: Path) -> None:
    dataset = json.loads(small_set.read_text())
    label_values = {int(k) for k in dataset["labels"]}
    for item in dataset["training"] + dataset["validation"] + dataset["test"]:
        image, label = nib.load(small_set.parent / item["image"]), nib.load(small_set.parent / item["label"])
        assert image.shape == label.shape == (32, 32, 32)
        np.testing.assert_array_equal(image.affine, label.affine)
        np.testing.assert_array_equal(image.affine, np.diag([1.5, 1.5, 1.5, 1.0]))
        label_array, image_array = np.asarray(label.dataobj), np.asarray(image.dataobj)
        assert label_array.dtype == np.uint8
        assert set(np.unique(label_array).tolist()) <= label_values
        assert image_array.min() < -900 and image_array.max() < 3072  # air is present, values are HU-like


def test_every_class_in_training(small_set: Path) -> None:
    dataset = json.loads(small_set.read_text())
    present = set()
    for item in dataset["training"]:
        present.update(np.unique(np.asarray(nib.load(small_set.parent / item["label"]).dataobj)).tolist())
    assert present == set(range(len(CLASS_NAMES) + 1))


def test_subjects_hold_a_subset_of_classes(small_set: Path) -> None:
    labels = _arrays(small_set)[1::2]
    counts = [len(np.unique(label)) - 1 for label in labels]
    assert all(count >= 0.5 * len(CLASS_NAMES) for count in counts)
    assert min(counts) < len(CLASS_NAMES)  # some references show a class that some queries lack


def test_families_are_shared_and_held_out_classes_are_new_combinations() -> None:
    families = {}
    for structure in STRUCTURES:
        families.setdefault(structure.family, []).append(structure)
    assert all(len(members) >= 3 for members in families.values())  # no intensity singles out a class
    training = {(s.family, s.texture) for s in STRUCTURES if s.name not in HELD_OUT_LABELS}
    for structure in STRUCTURES:
        if structure.name in HELD_OUT_LABELS:
            assert (structure.family, structure.texture) not in training
            assert any(texture is structure.texture for _, texture in training)  # its texture is known...
            assert any(family == structure.family for family, _ in training)  # ...and so is its family


def test_ensure_demo_data(
    small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stamp = small_set.stat().st_mtime_ns
    assert ensure_demo_data(small_set.parent) == str(small_set)
    assert small_set.stat().st_mtime_ns == stamp

    tiny = functools.partial(make_demo_dataset, num_training=1, num_validation=0, num_test=0, shape=(32, 32, 32))
    monkeypatch.setattr(demo_data, "make_demo_dataset", tiny)
    with caplog.at_level(logging.INFO, logger=demo_data.__name__):
        path = ensure_demo_data(tmp_path / "new")
    assert Path(path).is_file() and "Generating" in caplog.text


def test_cli(tmp_path: Path) -> None:
    command = [sys.executable, "scripts/make_demo_data.py", "--output_dir", str(tmp_path), "--shape", "32", "32", "32"]
    command += ["--num_training", "2", "--num_validation", "1", "--num_test", "1", "--seed", "3"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    assert (len(dataset["training"]), len(dataset["validation"]), len(dataset["test"])) == (2, 1, 1)
    assert (tmp_path / dataset["validation"][0]["image"]).is_file()


def test_metadata_class_lists_come_from_the_demo_data() -> None:
    """metadata.json describes the demo model's channels; demo_data.model_channels is their one source."""
    metadata = json.loads((REPO_ROOT / "bundle" / "configs" / "metadata.json").read_text())
    outputs = metadata["network_data_format"]
    bank, labels = demo_data.model_channels()
    assert outputs["outputs"]["pred"]["channel_def"] == bank
    assert outputs["outputs"]["pred"]["num_channels"] == len(bank) == len(CLASS_NAMES) - len(HELD_OUT_LABELS)
    assert outputs["post_processed_outputs"]["pred"]["channel_def"] == labels
    assert outputs["post_processed_outputs"]["pred"]["value_range"] == [0, max(int(value) for value in labels)]
