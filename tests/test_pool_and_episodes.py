"""Dataset pool checks and episode sampling on a small demo data set."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.data.demo_data import CLASS_NAMES, HELD_OUT_LABELS
from scripts.data.episodes import EpisodeDataset, OneShotValidationDataset
from scripts.data.patches import crop_patch
from scripts.data.pool import DatasetPool, DatasetPoolError
from scripts.segmentation.controls import control_dice

PATCH = (32, 32, 32)


@pytest.fixture(scope="module")
def pool(demo_dataset: Path) -> DatasetPool:
    return DatasetPool([str(demo_dataset)], split="training", num_workers=1)


def _copy_dataset(demo_dataset: Path, target: Path) -> Path:
    shutil.copytree(demo_dataset.parent, target)
    return target / "dataset.json"


def test_crop_patch_keeps_the_centre_voxel_and_zero_pads_at_the_borders() -> None:
    """Odd centres next to a border: the window ``centre - size // 2`` onwards, zeros outside the volume."""
    volume = torch.arange(1, 61, dtype=torch.int16).reshape(1, 5, 4, 3)  # no zero inside the volume
    patch = crop_patch(volume, (0, 3, 1), (3, 3, 2))  # window rows -1..1, 2..4, 0..1
    assert patch.dtype == torch.int16 and patch.shape == (1, 3, 3, 2)
    assert patch[0, 1, 1, 1] == volume[0, 0, 3, 1]  # the centre voxel at size // 2
    assert torch.equal(patch[0, 1:, :2, :], volume[0, 0:2, 2:4, 0:2])
    assert (patch[0, 0] == 0).all() and (patch[0, :, 2] == 0).all()  # above depth 0 and below row 3
    assert torch.equal(patch, crop_patch(MetaTensor(volume), (0, 3, 1), (3, 3, 2)))
    assert type(crop_patch(MetaTensor(volume), (0, 3, 1), (3, 3, 2))) is torch.Tensor
    assert not crop_patch(volume, (9, 0, 0), (3, 1, 1)).any()  # the whole window past the last slice


def test_crop_patch_of_a_single_slice_image_has_depth_one() -> None:
    image = torch.rand(1, 5, 4, 1) > 0.5
    patch = crop_patch(image, (4, 0, 0), (3, 3, 3))  # window rows 3..5, -1..1, the one slice
    assert patch.dtype == torch.bool and patch.shape == (1, 3, 3, 1)
    assert torch.equal(patch[0, :2, 1:], image[0, 3:5, 0:2]) and not patch[0, 2].any() and not patch[0, :, 0].any()


def test_pool_reads_classes_and_held_out_names(pool: DatasetPool) -> None:
    assert len(pool.subjects) == 6
    assert pool.class_names[0] == f"IrisDemo/{CLASS_NAMES[0]}"
    assert set(pool.held_out_class_names) == {f"IrisDemo/{name}" for name in HELD_OUT_LABELS}
    subject = pool.subjects[0]
    assert subject.image.shape == subject.label.shape == (1, 48, 48, 48)
    # CT window then z-score: the whole volume is normalised
    assert abs(subject.image.mean().item()) < 1e-3 and abs(subject.image.std().item() - 1) < 1e-2


def test_episodes_are_reproducible_and_well_formed(pool: DatasetPool) -> None:
    dataset = EpisodeDataset(pool, length=8, patch_size=PATCH, k_shot=2, max_classes=3, seed=7)
    first, again = dataset[3], dataset[3]
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(dataset[4]["query_image"], first["query_image"])
    assert first["support_image"].shape == (3, 2, 1, *PATCH)  # every class its own patch in each of the 2 shots
    assert first["support_mask"].shape == (3, 2, 1, *PATCH)
    assert first["query_image"].shape == (1, *PATCH)
    assert first["query_mask"].shape == (3, *PATCH)


def test_episodes_never_show_held_out_classes_and_supports_are_not_empty(pool: DatasetPool) -> None:
    dataset = EpisodeDataset(pool, length=40, patch_size=PATCH, k_shot=1, max_classes=4, seed=1)
    held_out = set(pool.held_out_class_names)
    for index in range(len(dataset)):
        item = dataset[index]
        valid = item["class_valid"]
        assert valid[0] and valid.sum() >= 1
        names = [pool.class_names[i] for i in item["class_ids"][valid].tolist()]
        assert not held_out & set(names)
        assert (item["class_ids"][~valid] == -1).all()
        assert (item["support_mask"][~valid] == 0).all() and (item["support_image"][~valid] == 0).all()
        shown = item["support_mask"][valid].flatten(2).sum(-1)  # classes x shots
        assert (shown[0] > 0).all() and (shown > 0).float().mean() > 0.9  # each patch shows its class


def test_held_out_voxels_are_background_or_unlabelled(pool: DatasetPool) -> None:
    """The same episodes either way; only the mask of voxels the loss leaves out differs."""
    options = {"length": 30, "patch_size": PATCH, "max_classes": 4, "seed": 3}
    background = EpisodeDataset(pool, **options, held_out_voxels="background")
    unlabelled = EpisodeDataset(pool, **options)  # the default
    marked = 0
    for index in range(len(background)):
        item, masked = background[index], unlabelled[index]
        assert torch.equal(item["query_image"], masked["query_image"])
        assert torch.equal(item["query_mask"], masked["query_mask"])
        assert not item["query_unlabelled"].any()
        assert not (masked["query_mask"].bool() & masked["query_unlabelled"]).any()  # never a requested class
        marked += int(masked["query_unlabelled"].sum())
    assert marked > 0  # the queries do hold held-out structures
    with pytest.raises(ValueError, match="held_out_voxels"):
        EpisodeDataset(pool, **options, held_out_voxels="ignore")


def test_similar_intensity_requests_absent_classes_that_a_threshold_cannot_tell_apart(pool: DatasetPool) -> None:
    """Hard negatives: the absent classes requested are closer in intensity to the query's structures than at random,
    and the rest of the episode is unchanged."""
    options = {"length": 60, "patch_size": PATCH, "max_classes": 4, "seed": 5}
    random = EpisodeDataset(pool, **options)
    similar = EpisodeDataset(pool, **options, absent_class_choice="similar_intensity")
    means = similar._intensities[0]
    gaps: dict[str, list[float]] = {"random": [], "similar": []}
    for index in range(len(random)):
        for name, item in (("random", random[index]), ("similar", similar[index])):
            valid = item["class_valid"]
            ids = item["class_ids"][valid].tolist()
            value = {pool.class_names.index(pool.datasets[0].class_name(v)): v for v in means}
            present = [value[i] for i, mask in zip(ids, item["query_mask"][valid]) if mask.any()]
            absent = [value[i] for i, mask in zip(ids, item["query_mask"][valid]) if not mask.any()]
            gaps[name] += [min(abs(means[a] - means[p]) for p in present) for a in absent if present]
        assert torch.equal(random[index]["query_image"], similar[index]["query_image"])
    assert len(gaps["similar"]) > 20
    assert np.mean(gaps["similar"]) < 0.7 * np.mean(gaps["random"])
    with pytest.raises(ValueError, match="absent_class_choice"):
        EpisodeDataset(pool, **options, absent_class_choice="hardest")


def test_synthetic_classes_take_the_last_slot_and_leave_the_rest_of_the_episode_alone(pool: DatasetPool) -> None:
    """A synthetic class is valid but has no class id (no memory-bank row), every reference shows it, the query holds
    it or not (an empty target), and the real classes' slots are those of the same episode without it."""
    options = {"length": 40, "patch_size": PATCH, "max_classes": 4, "seed": 4}
    plain = EpisodeDataset(pool, **options)
    synthetic = EpisodeDataset(pool, **options, synthetic_class_prob=1.0)
    in_query = 0
    for index in range(len(plain)):
        item, base = synthetic[index], plain[index]
        valid = item["class_valid"]
        slot = int(valid.sum()) - 1
        assert item["class_ids"][slot] == -1 and (item["class_ids"][:slot] >= 0).all()
        assert (item["support_mask"][slot].flatten(1).sum(-1) > 50).all()  # each reference shows the structure
        assert torch.equal(item["class_ids"][:slot], base["class_ids"][:slot])
        assert torch.equal(item["support_image"][:slot], base["support_image"][:slot])
        in_query += int(item["query_mask"][slot].any())
        changed = item["query_image"] != base["query_image"]
        assert not (item["query_mask"][:slot].bool() & ~base["query_mask"][:slot].bool()).any()  # pasted over
        assert changed.any() or not item["query_mask"][slot].any()
    assert 0.3 < in_query / len(plain) < 0.95  # present, and absent as an empty target
    with pytest.raises(ValueError, match="synthetic_class_prob"):
        EpisodeDataset(pool, **options, synthetic_class_prob=1.5)


def test_episodes_cannot_be_solved_without_the_reference(pool: DatasetPool) -> None:
    """Requested classes absent from the query and several classes per episode."""
    dataset = EpisodeDataset(pool, length=60, patch_size=PATCH, max_classes=4, seed=2)
    empty, requested = 0, []
    for index in range(len(dataset)):
        item = dataset[index]
        valid = item["class_valid"]
        requested.append(int(valid.sum()))
        empty += int((item["query_mask"][valid].flatten(1).sum(-1) == 0).sum())
    assert empty / sum(requested) > 0.15  # absent classes are asked for
    assert np.mean(requested) > 1.8 and max(requested) == 4
    only_anchor = EpisodeDataset(pool, length=20, patch_size=PATCH, seed=2, query_crop={"anchor": 1.0})
    assert all(only_anchor[i]["query_mask"][0].sum() > 0 for i in range(20))  # the anchor is in the query patch


def test_query_crops_reach_structures_that_are_not_requested(pool: DatasetPool) -> None:
    dataset = EpisodeDataset(pool, length=40, patch_size=PATCH, seed=3, query_crop={"other_class": 1.0})
    queries = [dataset[i] for i in range(len(dataset))]
    anchor_absent = sum(int(item["query_mask"][0].sum() == 0) for item in queries)
    assert anchor_absent > 5  # centred on another structure, the query often lacks the anchor
    with pytest.raises(ValueError, match="query_crop"):
        EpisodeDataset(pool, length=4, patch_size=PATCH, query_crop={"middle": 1.0})


def test_curriculum_goes_from_large_single_anchored_classes_to_full_episodes(pool: DatasetPool) -> None:
    """Early episodes: one class, large structures, the anchor in the query; late ones as without a curriculum; and
    an episode is the same whether the dataset was resumed or not."""
    curriculum = EpisodeDataset(pool, length=80, patch_size=PATCH, max_classes=4, seed=4, curriculum_iterations=40)
    assert [curriculum.difficulty(i) for i in (0, 20, 40, 79)] == [0.0, 0.5, 1.0, 1.0]
    easy = [curriculum[i] for i in range(12)]
    assert all(int(item["class_valid"].sum()) == 1 for item in easy[:2])  # difficulty below 1/6: the anchor alone
    assert all(item["query_mask"][0].sum() > 0 for item in easy[:2])  # centred on the anchor
    sizes = curriculum._class_sizes[0]
    anchors = [pool.class_names[int(item["class_ids"][0])].split("/")[1] for item in easy]
    values = {name: value for value, name in pool.datasets[0].labels.items()}
    mean_anchor = np.mean([sizes[values[name]] for name in anchors])
    assert mean_anchor > np.mean(list(sizes.values()))  # large structures first
    plain = EpisodeDataset(pool, length=80, patch_size=PATCH, max_classes=4, seed=4)
    for key, value in plain[60].items():  # past the curriculum, episodes are those of a run without one
        assert torch.equal(value, curriculum[60][key]), key
    curriculum.start = 10  # a resumed run: index 0 is episode 10
    assert torch.equal(curriculum[0]["query_image"], easy[10]["query_image"])
    with pytest.raises(ValueError, match="curriculum_iterations"):
        EpisodeDataset(pool, length=4, patch_size=PATCH, curriculum_iterations=-1)


def test_validation_cases_bring_one_reference_per_class(demo_dataset: Path, pool: DatasetPool) -> None:
    validation = DatasetPool([str(demo_dataset)], split="validation", num_workers=1)
    dataset = OneShotValidationDataset(validation, pool, PATCH, seed=0, controls=control_dice)
    case = dataset[0]
    k = len(case["class_ids"])
    assert k == len({pool.class_names[i] for i in case["class_ids"].tolist()})  # every class with a reference
    assert case["query_image"].shape == (1, 48, 48, 48)
    assert case["query_mask"].shape == (k, 48, 48, 48)
    assert case["support_image"].shape == (k, 1, 1, *PATCH)
    assert (case["support_mask"].flatten(1).sum(-1) > 0).all()
    assert any(pool.class_names[i] in pool.held_out_class_names for i in case["class_ids"].tolist())
    present = case["class_present"]
    assert torch.equal(present, case["query_mask"].flatten(1).sum(-1) >= pool.min_class_voxels)
    assert case["control_dice"].shape == (k, 2)
    assert torch.isnan(case["control_dice"][~present]).all() and not torch.isnan(case["control_dice"][present]).any()
    cases = [dataset[i] for i in range(len(dataset))]
    assert any((~c["class_present"]).any() for c in cases)  # some references show a class the query lacks


def test_every_bad_entry_is_reported_at_once(demo_dataset: Path, tmp_path: Path) -> None:
    dataset_json = _copy_dataset(demo_dataset, tmp_path / "bad")
    root = dataset_json.parent
    content = json.loads(dataset_json.read_text())
    entries = content["training"]
    (root / entries[0]["image"]).unlink()  # missing file
    (root / entries[1]["image"]).write_bytes(b"not a nifti file")  # unreadable
    label = nib.load(root / entries[2]["label"])
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:40], label.affine), root / entries[2]["label"])  # shape
    label = nib.load(root / entries[3]["label"])
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), label.affine * 2), root / entries[3]["label"])  # affine
    data = np.asarray(nib.load(root / entries[4]["label"]).dataobj).copy()
    data[0, 0, 0] = 99
    nib.save(nib.Nifti1Image(data, nib.load(root / entries[4]["label"]).affine), root / entries[4]["label"])  # value
    with pytest.raises(DatasetPoolError) as error:
        DatasetPool([str(dataset_json)], num_workers=1)
    message = str(error.value)
    assert "5 invalid 'training' entries" in message
    assert f"{entries[0]['image']}: file not found" in message
    assert "cannot be read" in message and entries[1]["image"] in message
    assert "shape" in message and entries[2]["label"] in message
    assert "affine" in message and entries[3]["label"] in message
    assert "[99]" in message and entries[4]["label"] in message


def test_skip_invalid_and_unusable_subjects_warn(demo_dataset: Path, tmp_path: Path, caplog) -> None:
    dataset_json = _copy_dataset(demo_dataset, tmp_path / "skip")
    entries = json.loads(dataset_json.read_text())["training"]
    (dataset_json.parent / entries[0]["image"]).unlink()
    empty = nib.load(dataset_json.parent / entries[1]["label"])
    nib.save(nib.Nifti1Image(np.zeros(empty.shape, np.uint8), empty.affine), dataset_json.parent / entries[1]["label"])
    with caplog.at_level(logging.WARNING):
        pool = DatasetPool([str(dataset_json)], num_workers=1, skip_invalid=True)
    assert len(pool.subjects) == 4
    assert "file not found" in caplog.text and "no labelled class" in caplog.text


def test_bad_dataset_description_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetPoolError, match="does not exist"):
        DatasetPool([str(tmp_path / "missing" / "dataset.json")])
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"0": "bg", "1": "a"}, "training": [], "held_out_labels": ["b"]})
    )
    with pytest.raises(DatasetPoolError, match="held_out_labels"):
        DatasetPool([str(tmp_path / "dataset.json")])


def test_disk_cache_gives_the_same_episodes_and_is_reused(demo_dataset: Path, pool: DatasetPool, tmp_path: Path):
    cache_dir = tmp_path / "cache"
    on_disk = DatasetPool([str(demo_dataset)], num_workers=1, cache="disk", cache_dir=str(cache_dir))
    assert all(subject.tensors is None for subject in on_disk.subjects)  # nothing held in memory
    files = {path: path.stat().st_mtime_ns for path in cache_dir.glob("*.pt")}
    assert len(files) == len(pool.subjects)
    in_memory = EpisodeDataset(pool, length=4, patch_size=PATCH, seed=3)
    from_disk = EpisodeDataset(on_disk, length=4, patch_size=PATCH, seed=3)
    for key, value in in_memory[2].items():
        assert torch.equal(value, from_disk[2][key]), key
    again = DatasetPool([str(demo_dataset)], num_workers=1, cache="disk", cache_dir=str(cache_dir))
    assert {path: path.stat().st_mtime_ns for path in cache_dir.glob("*.pt")} == files  # reused, not rewritten
    assert [s.foreground.keys() for s in again.subjects] == [s.foreground.keys() for s in pool.subjects]
    with pytest.raises(ValueError, match="cache must be"):
        DatasetPool([str(demo_dataset)], cache="gpu")


def test_a_copy_of_the_data_in_another_folder_gives_the_same_episodes(
    demo_dataset: Path, pool: DatasetPool, tmp_path: Path
) -> None:
    copy = DatasetPool([str(_copy_dataset(demo_dataset, tmp_path / "elsewhere" / "demo"))], num_workers=1)
    for original, copied in zip(pool.subjects, copy.subjects):
        assert original.foreground.keys() == copied.foreground.keys()
        for value, coords in original.foreground.items():
            assert np.array_equal(coords, copied.foreground[value]), (original.image_path, value)
    episodes = [EpisodeDataset(p, length=6, patch_size=PATCH, max_classes=3, seed=11) for p in (pool, copy)]
    for index in range(6):
        for key, value in episodes[0][index].items():
            assert torch.equal(value, episodes[1][index][key]), (index, key)
