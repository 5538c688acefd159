"""Real images: derived classes, the data plan and its field-of-view warning, modality names, the real-data check."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from scripts.data.derived_classes import DerivedClass, centroid
from scripts.data.episodes import EpisodeDataset
from scripts.data.planning import PoolGeometry, check_field_of_view, field_of_view_problem, plan, pool_geometry
from scripts.data.pool import DatasetPool
from scripts.data.transforms import AppendCoordinatesd, intensity_normalization, normalisation
from scripts.networks import build_iris_net
from scripts.segmentation.model_io import (
    ModelSettingsError,
    check_requested,
    model_modality,
    read_model_settings,
    training_settings,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PATCH = (32, 32, 32)


@pytest.fixture(scope="module")
def pool(demo_dataset: Path) -> DatasetPool:
    return DatasetPool([str(demo_dataset)], split="training", num_workers=1)


def test_a_derived_half_lies_on_the_side_of_its_neighbour_in_every_subject(pool: DatasetPool) -> None:
    subjects = pool.subjects[:3]
    shared = sorted(set.intersection(*(subject.classes for subject in subjects)))
    rng = np.random.default_rng(0)
    half = DerivedClass.draw(rng, shared, subjects)
    half = DerivedClass(half.base, half.other, "half")
    for subject in subjects:
        label = subject.label
        inside = half.contains(subject, label, (0, 0, 0)).numpy()
        base = label[0].numpy() == half.base
        assert inside.any() and (inside <= base).all() and inside.sum() < base.sum()
        facing = centroid(subject, half.other) - centroid(subject, half.base)
        voxels = np.argwhere(inside)
        assert ((voxels - centroid(subject, half.base)) @ facing > 0).all()  # the half that faces the neighbour
        union = DerivedClass(half.base, half.other, "union").contains(subject, label, (0, 0, 0)).numpy()
        assert (union == (base | (label[0].numpy() == half.other))).all()
        # a patch that starts elsewhere sees the same voxels where it overlaps
        patch = label[:, 8:, 4:, 0:]
        assert (half.contains(subject, patch, (8, 4, 0)).numpy() == inside[8:, 4:, 0:]).all()


def test_episodes_with_derived_classes_request_a_new_parcel_and_not_its_parts(pool: DatasetPool) -> None:
    dataset = EpisodeDataset(pool, length=12, patch_size=PATCH, seed=3, derived_class_prob=1.0)
    plain = EpisodeDataset(pool, length=12, patch_size=PATCH, seed=3)
    for index in range(len(dataset)):
        item = dataset[index]
        last = int(item["class_valid"].sum()) - 1
        assert item["class_ids"][last] == -1  # the derived class: no dataset class, no memory-bank row
        assert (item["support_mask"][last].flatten(1).sum(1) > 0).all()  # every reference shows it
        assert set(item["class_ids"][:last].tolist()) <= set(range(len(pool.class_names)))
    # without derived classes the episodes are exactly those of before
    unchanged = EpisodeDataset(pool, length=12, patch_size=PATCH, seed=3, derived_class_prob=0.0)
    assert all(torch.equal(unchanged[i]["query_image"], plain[i]["query_image"]) for i in range(4))
    with pytest.raises(ValueError, match="add up to at most 1"):
        EpisodeDataset(pool, length=2, patch_size=PATCH, synthetic_class_prob=0.6, derived_class_prob=0.6)


def _is_place_grid(coordinates: torch.Tensor) -> bool:
    """Whether 3 x D x H x W channels are a place grid inside the volume (a patch's padding beyond the volume's border
    is zero in every channel): channel ``a`` changes along axis ``a`` only, in equal positive steps."""
    inside = coordinates.abs().sum(0) > 0
    if inside.float().mean() < 0.5:
        return False
    for axis in range(3):
        for other in range(3):
            size = inside.shape[other]
            pairs = inside.narrow(other, 0, size - 1) & inside.narrow(other, 1, size - 1)
            steps = coordinates[axis].diff(dim=other)[pairs]
            if other != axis and steps.abs().max() > 1e-6:
                return False
            if other == axis and (not torch.allclose(steps, steps[0], atol=1e-5) or steps[0] <= 0):
                return False
    return True


def test_coordinate_channels_give_each_voxel_its_place_in_the_volume() -> None:
    volume = {"image": torch.randn(1, 5, 4, 3)}
    out = AppendCoordinatesd("image")(volume)["image"]
    assert out.shape == (4, 5, 4, 3) and torch.equal(out[0], volume["image"][0])
    assert _is_place_grid(out[1:])
    assert [float(out[1 + axis].min()) for axis in range(3)] == [-1.0] * 3
    assert [float(out[1 + axis].max()) for axis in range(3)] == [1.0] * 3


def test_episodes_carry_coordinates_that_augmentation_moves_but_never_rescales(demo_dataset: Path) -> None:
    """The image channels of a query are exactly those without coordinates (the first augmented crop of an episode:
    MONAI's RandAffined draws once more per key, so later crops' draws differ); the coordinate channels escape
    intensity augmentation, query noise and pasted synthetic structures."""
    placed = DatasetPool([str(demo_dataset)], split="training", num_workers=1, coordinate_channels=True)
    plain = DatasetPool([str(demo_dataset)], split="training", num_workers=1)
    options = {"patch_size": PATCH, "seed": 5, "synthetic_class_prob": 0.5, "query_noise_std": 0.5}
    with_places, without = EpisodeDataset(placed, length=4, **options), EpisodeDataset(plain, length=4, **options)
    for index in range(4):
        item, reference = with_places[index], without[index]
        assert item["query_image"].shape[0] == 4 and item["support_image"].shape[-4] == 4
        assert torch.equal(item["query_image"][:1], reference["query_image"])
        assert torch.equal(item["query_mask"], reference["query_mask"])
    unmoved = {"rotation_degrees": 0.0, "scale_range": 0.0, "translation_fraction": 0.0, "flip_prob": 0.0,
               "augmentation_prob": 1.0, "intensity_scale": 0.5, "intensity_shift": 0.5}  # fmt: skip
    dataset = EpisodeDataset(placed, length=4, augmentation_kwargs=unmoved, **options)
    for index in range(4):
        item = dataset[index]
        assert _is_place_grid(item["query_image"][1:])
        valid = item["class_valid"]
        assert all(_is_place_grid(patch[1:]) for patch in item["support_image"][valid].flatten(0, 1))


def test_the_plan_trades_resolution_for_a_view_of_structure_and_neighbours() -> None:
    brain = PoolGeometry(np.array([1.0] * 3), np.array([108.0, 127.0, 88.0]), np.array([22.0, 23.5, 26.5]), 12.0)
    cpu = plan(brain, patch_edge=32)
    assert cpu.target_spacing == [1.7] * 3 and cpu.patch_size == [32, 32, 32] and not cpu.warnings
    assert min(cpu.field_of_view_mm) >= 2 * 26.5
    gpu = plan(brain, patch_edge=128)
    assert gpu.target_spacing == [1.0] * 3 and gpu.patch_size == [112, 128, 96]  # the whole image, finest spacing
    problem = field_of_view_problem(brain, [32, 32, 32], [1.0, 1.0, 1.0])
    assert "sees 32x32x32 mm" in problem and "neighbours" in problem
    assert field_of_view_problem(brain, [32, 32, 32], [2.0, 2.0, 2.0]) is None


def test_training_warns_at_start_when_a_patch_sees_too_little(pool: DatasetPool, caplog) -> None:
    geometry = pool_geometry(pool)
    assert geometry.spacing.tolist() == [1.5, 1.5, 1.5]
    with caplog.at_level(logging.WARNING):
        assert check_field_of_view(pool, [32, 32, 32]) is None  # the demo's patch sees its structures' neighbours
        problem = check_field_of_view(pool, [8, 8, 8])
    assert problem and [record.message for record in caplog.records] == [f"Field of view: {problem}"]


@pytest.mark.parametrize(
    "names, kind",
    [
        (["CT", "ct"], "ct_window"),
        (["MRI", "MR", "mr", "T1", "T1w", "T2", "T2w", "FLAIR", "ADC", "PET"], "percentile"),
        (["zscore", "ZScore"], "zscore"),
        (["rescale_to_0_1"], "rescale_to_0_1"),
        (["noNorm", "nonorm"], "none"),
        (["ultrasound", "dermoscopy"], "percentile"),
    ],
)
def test_modality_names_of_msd_and_nnunet_map_to_a_normalisation(names: list[str], kind: str) -> None:
    assert {normalisation(name) for name in names} == {kind}
    image = torch.linspace(-2000, 3000, 1000).reshape(1, 10, 10, 10)
    normalised = intensity_normalization(names[0])({"image": image})["image"]
    if kind == "none":
        assert torch.equal(normalised, image)
    elif kind == "rescale_to_0_1":
        assert normalised.min() == 0 and normalised.max() == 1
    else:
        assert abs(float(normalised.mean())) < 1e-4 and abs(float(normalised.std()) - 1) < 1e-2


def test_a_model_accepts_any_name_of_its_normalisations_and_names_them_otherwise(tmp_path: Path) -> None:
    datasets = []
    for name, modality in (("Brains", "MRI"), ("Bodies", "CT")):
        folder = tmp_path / name
        folder.mkdir()
        content = {"name": name, "modality": {"0": modality}, "labels": {"0": "background", "1": "x"}, "training": []}
        (folder / "dataset.json").write_text(json.dumps(content))
        datasets.append(str(folder / "dataset.json"))
    net = build_iris_net(base_channels=4, num_heads=2, num_query_tokens=2, channel_multipliers=(1, 2, 4, 8),
                         settings=training_settings(datasets, [32, 32, 32], None))  # fmt: skip
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    for name in ("MR", "t2w", "FLAIR", "ct"):
        check_requested(path, {"modality": name})
    with pytest.raises(ModelSettingsError, match=r"Bodies|CT \(ct_window\) and MRI \(percentile\)") as error:
        check_requested(path, {"modality": "zscore"})
    assert "zscore" in str(error.value)
    with pytest.raises(ModelSettingsError, match=r"CT \(ct_window\) and MRI \(percentile\).*--modality"):
        model_modality(path)
    mri_only = build_iris_net(base_channels=4, num_heads=2, num_query_tokens=2, channel_multipliers=(1, 2, 4, 8),
                              settings=training_settings(datasets[:1], [32, 32, 32], None))  # fmt: skip
    torch.save(mri_only.state_dict(), path)
    assert model_modality(path) == "MRI"


def test_the_real_data_check_passes_on_off_ids_as_the_bundle_command_line_reads_them() -> None:
    spec = importlib.util.spec_from_file_location("real_data_check", REPO_ROOT / "scripts" / "real_data_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    overrides = {"coordinate_channels": True, "patch_size": [32, 32, 32], "loss": "dice", "pretrained_checkpoint": None}
    assert module.override_arguments(overrides) == [
        "--coordinate_channels", "True", "--patch_size", "[32, 32, 32]", "--loss", "dice",
        "--pretrained_checkpoint", "null",
    ]  # fmt: skip


@pytest.mark.slow
def test_the_real_data_check_writes_its_report_and_a_picture_per_case(demo_dataset: Path, tmp_path: Path) -> None:
    """scripts/real_data_check.py end to end on the demo data with a tiny network that takes coordinate channels:
    training, every strategy with the largest component kept, the controls and the UNet, the JSON the issue asks for,
    one picture per case."""
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"base_channels": 4, "network_def#num_heads": 2, "num_query_tokens": 2,
                                "network_def#channel_multipliers": [1, 2, 4, 8], "patch_size": [32, 32, 32],
                                "total_iterations": 4, "eval_every": 4, "checkpoint_every": 4, "batch_size": 1,
                                "num_workers": 0, "cache_workers": 1, "augmentation#flip_axes": [],
                                "coordinate_channels": True}))  # fmt: skip
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "real_data_check.py"), "--dataset", str(demo_dataset),
         "--output_dir", str(out), "--preset", str(tiny), "--draws", "1", "--unet_seconds", "3", "--tuning_steps", "2",
         "--groups", "['held_out']", "--keep_largest_component", "True"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "real_data_check.json").read_text())
    methods = {"one_shot", "ensemble", "tuning", "wrong_reference", "unet_1shot", "position_rule", "intensity_rule"}
    assert methods <= set(report["held_out"]) and report["training_minutes"] > 0
    assert all(0.0 <= report["held_out"][method] <= 1.0 for method in methods)
    validation = json.loads(demo_dataset.read_text())["validation"]
    pictures = sorted(path.name for path in (out / "cases").glob("*.png"))
    assert pictures == sorted(f"{Path(case['image']).name.split('.')[0]}_held_out.png" for case in validation)
    assert read_model_settings(out / "models" / "model.pt")["coordinate_channels"] is True
    assert report["keep_largest_component"] is True  # passed to inference.json: each class one object in every map
    maps = [np.asarray(nib.load(path).dataobj) for path in (out / "work").glob("held_out/draw0/*/*_seg.nii.gz")]
    assert maps and all(ndimage.label(labels == value)[1] == 1 for labels in maps for value in np.unique(labels)[1:])
