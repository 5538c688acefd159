"""scripts/prepare_datasets.py on small datasets in every layout (MSD, nnU-Net v2 with NRRD, DICOM series folder,
2D PNG), their modality normalisation, 2D episodes, a pooled training run and 2D inference."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from scripts.data.episodes import EpisodeDataset
from scripts.data.pool import DatasetPool
from scripts.networks import build_iris_net

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("prepare_datasets", REPO_ROOT / "scripts" / "prepare_datasets.py")
prepare_datasets = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(prepare_datasets)

SHAPE = (24, 24, 16)  # x, y, z of the 3D fixtures
CASES = 4


def _case(rng: np.random.Generator, shape: tuple[int, ...], low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """An image with uniform intensities in [low, high] and a label with a box (1) and a sphere-ish blob (2)."""
    image = rng.uniform(low, high, size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[2:10, 3:11, ...] = 1
    centre = np.array(shape) // 2 + 3
    grid = np.indices(shape).reshape(len(shape), -1).T
    label.reshape(-1)[np.linalg.norm(grid - centre[: len(shape)], axis=1) < 5] = 2
    return image, label


def _msd(root: Path) -> Path:
    """MSD layout, NIfTI, CT in [-2000, 3000] HU (beyond the window on both sides)."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for index in range(CASES):
        image, label = _case(rng, SHAPE, -2000, 3000)
        affine = np.diag([0.8, 0.8, 2.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"liver_{index}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"liver_{index}.nii.gz")
        training.append({"image": f"./imagesTr/liver_{index}.nii.gz", "label": f"./labelsTr/liver_{index}.nii.gz"})
    content = {"name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "tumour"}}
    (root / "dataset.json").write_text(json.dumps({**content, "training": training, "test": []}))
    return root


def _nnunet(root: Path) -> Path:
    """nnU-Net v2 raw layout with NRRD files, MR intensities in [0, 1000]."""
    rng = np.random.default_rng(1)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for index in range(CASES):
        image, label = _case(rng, SHAPE, 0, 1000)
        for array, path in (
            (image, f"imagesTr/prostate_{index:03d}_0000.nrrd"),
            (label, f"labelsTr/prostate_{index:03d}.nrrd"),
        ):
            volume = itk.image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0)))  # ITK arrays are z, y, x
            volume.SetSpacing((0.6, 0.6, 3.0))
            itk.imwrite(volume, str(root / path))
    content = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "gland": 1, "lesion": 2}}
    (root / "dataset.json").write_text(json.dumps({**content, "numTraining": CASES, "file_ending": ".nrrd"}))
    return root


def _dicom_series(folder: Path, volume: np.ndarray) -> None:
    """Write an x, y, z int16 volume as a CT DICOM series (one file per z slice)."""
    folder.mkdir(parents=True)
    series, study = generate_uid(), generate_uid()
    for z in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = study, series, "CT", "fixture"
        ds.InstanceNumber, ds.ImagePositionPatient, ds.ImageOrientationPatient = (
            z + 1,
            [0.0, 0.0, 2.5 * z],
            [1, 0, 0, 0, 1, 0],
        )
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, z].T).astype(np.int16).tobytes()  # rows are y
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(folder / f"slice_{z:03d}.dcm", ds, write_like_original=False)


def _dicom_folder(root: Path) -> Path:
    """``folder`` layout: DICOM series folders as images, NIfTI labels in the series' geometry."""
    from monai.transforms import LoadImage

    rng = np.random.default_rng(2)
    (root / "labels").mkdir(parents=True)
    for index in range(CASES):
        image, label = _case(rng, SHAPE, -1000, 1000)
        _dicom_series(root / "images" / f"covid_{index}", image.astype(np.int16))
        series = LoadImage(image_only=True)(str(root / "images" / f"covid_{index}"))  # x, y, z in RAS world
        nib.save(nib.Nifti1Image(label, series.affine.numpy()), root / "labels" / f"covid_{index}.nii.gz")
    return root


def _png_folder(root: Path) -> Path:
    """``folder2d`` layout: RGB PNG images and 0/255 PNG masks named ``<case>_mask.png``."""
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for index in range(CASES):
        image, label = _case(rng, (32, 40), 0, 255)
        rgb = np.stack([image, image * 0.5, 255 - image], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"lesion_{index}.png")
        Image.fromarray(((label == 2) * 255).astype(np.uint8)).save(root / "labels" / f"lesion_{index}_mask.png")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four fixture datasets, prepared into ``out/<format>/dataset.json``."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("prepared")
    return {
        "msd": prepare_datasets.prepare(str(_msd(source / "msd")), "msd", str(out / "msd"), validation_fraction=0.25),
        "nnunet": prepare_datasets.prepare(
            str(_nnunet(source / "Dataset005_Prostate")), "nnunet", str(out / "nnunet"), held_out_labels=["lesion"]
        ),
        "folder": prepare_datasets.prepare(
            str(_dicom_folder(source / "covid")),
            "folder",
            str(out / "folder"),
            modality="CT",
            labels={1: "lung", 2: "lesion"},
        ),
        "folder2d": prepare_datasets.prepare(
            str(_png_folder(source / "isic")),
            "folder2d",
            str(out / "folder2d"),
            modality="dermoscopy",
            labels={255: "lesion"},
            label_suffix="_mask",
        ),
    }


def test_every_layout_is_prepared_with_relative_paths_and_a_fixed_split(prepared: dict[str, Path]) -> None:
    expected = {
        "msd": ("Liver", "CT", {"1": "liver", "2": "tumour"}),
        "nnunet": ("Prostate", "T2", {"1": "gland", "2": "lesion"}),
        "folder": ("covid", "CT", {"1": "lung", "2": "lesion"}),
        "folder2d": ("isic", "dermoscopy", {"255": "lesion"}),
    }
    for layout, path in prepared.items():
        content = json.loads(path.read_text())
        name, modality, labels = expected[layout]
        assert (content["name"], content["modality"], content["labels"]) == (
            name,
            {"0": modality},
            {"0": "background", **labels},
        )
        assert len(content["training"]) == 3 and len(content["validation"]) == 1, layout
        for entry in content["training"] + content["validation"]:
            assert not Path(entry["image"]).is_absolute() and (path.parent / entry["image"]).exists()
    assert json.loads(prepared["nnunet"].read_text())["held_out_labels"] == ["lesion"]
    again = prepare_datasets.prepare(
        str(prepared["msd"].parent / json.loads(prepared["msd"].read_text())["training"][0]["image"]).split(
            "/imagesTr"
        )[0],
        "msd",
        str(prepared["msd"].parent.parent / "msd_again"),
        validation_fraction=0.25,
    )
    assert json.loads(again.read_text())["validation"][0]["image"].endswith(
        json.loads(prepared["msd"].read_text())["validation"][0]["image"].split("/")[-1]
    )  # the same seed gives the same split


def test_every_problem_is_reported_before_anything_is_written(tmp_path: Path) -> None:
    root = _png_folder(tmp_path / "bad")
    Image.open(root / "images" / "lesion_0.png").save(root / "images" / "orphan.png")  # no mask
    mask = np.asarray(Image.open(root / "labels" / "lesion_1_mask.png")).copy()
    mask[0, 0] = 7
    Image.fromarray(mask).save(root / "labels" / "lesion_1_mask.png")  # value not in the map
    Image.fromarray(mask[:20]).save(root / "labels" / "lesion_2_mask.png")  # shape differs
    (root / "labels" / "lesion_3_mask.png").write_bytes(b"not a png")  # unreadable
    with pytest.raises(prepare_datasets.PreparationError) as error:
        prepare_datasets.prepare(
            str(root), "folder2d", str(tmp_path / "out"), modality="XR", labels={255: "lesion"}, label_suffix="_mask"
        )
    message = str(error.value)
    assert "4 problems" in message and "dataset.json not written" in message
    assert "orphan.png: no label file" in message
    assert "lesion_1_mask.png: label values [7]" in message
    assert "lesion_2_mask.png: shape" in message
    assert "lesion_3_mask.png: cannot be read" in message
    assert not (tmp_path / "out" / "dataset.json").exists()
    with pytest.raises(prepare_datasets.PreparationError, match="needs --modality and --labels"):
        prepare_datasets.prepare(str(root), "folder2d", str(tmp_path / "out"))
    with pytest.raises(prepare_datasets.PreparationError, match="--format must be one of"):
        prepare_datasets.prepare(str(root), "kaggle", str(tmp_path / "out"))


def test_ct_and_mr_are_normalised_by_modality(prepared: dict[str, Path]) -> None:
    pool = DatasetPool([str(prepared["msd"]), str(prepared["nnunet"])], num_workers=1)
    for subject in pool.subjects:
        info = pool.datasets[subject.dataset]
        original = np.asarray(nib.load(subject.image_path).dataobj) if info.modality == "CT" else None
        if original is None:
            original = itk.array_from_image(itk.imread(subject.image_path))
        if info.modality == "CT":  # [-990, 500] HU window, then z-score
            clipped = np.clip(original, -990, 500)
        else:  # 2nd-98th percentile clip, then z-score
            clipped = np.clip(original, *np.percentile(original, (2, 98)))
        expected = (clipped - clipped.mean()) / clipped.std()
        image = subject.image
        assert abs(image.mean().item()) < 1e-4 and abs(image.std(unbiased=False).item() - 1) < 1e-3
        np.testing.assert_allclose(
            [image.min().item(), image.max().item()], [expected.min(), expected.max()], rtol=1e-3
        )
    # the CT window really clips: the fixtures span [-2000, 3000] HU
    ct = next(s for s in pool.subjects if pool.datasets[s.dataset].modality == "CT")
    assert (ct.image == ct.image.max()).float().mean() > 0.2


def test_2d_images_give_single_slice_episodes_and_batches_never_mix_datasets(prepared: dict[str, Path]) -> None:
    pool = DatasetPool([str(prepared["msd"]), str(prepared["folder2d"])], num_workers=1)
    planar = [s for s in pool.subjects if pool.datasets[s.dataset].name == "isic"]
    assert planar and all(s.image.shape == (1, 40, 32, 1) for s in planar)  # width first, RGB became one channel
    episodes = EpisodeDataset(
        pool, length=16, patch_size=(16, 16, 16), k_shot=1, max_classes=2, seed=0, episodes_per_iteration=2
    )
    shapes = [tuple(episodes[i]["query_image"].shape) for i in range(16)]
    assert set(shapes) == {(1, 16, 16, 16), (1, 16, 16, 1)}
    assert all(shapes[i] == shapes[i + 1] for i in range(0, 16, 2))  # one dataset per batch
    item = next(episodes[i] for i in range(16) if shapes[i][-1] == 1)
    assert item["support_image"].shape == (2, 1, 1, 16, 16, 1) and item["support_mask"][0, 0].sum() > 0


@pytest.mark.slow
def test_pooled_training_runs_on_every_prepared_layout(prepared: dict[str, Path], tmp_path: Path) -> None:
    output_dir = tmp_path / "logs"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", "bundle/configs/train.json",
        "--bundle_root", "bundle",
        "--data_pool", json.dumps([str(path) for path in prepared.values()]),
        "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(output_dir),
        "--base_channels", "4", "--num_query_tokens", "3",
        "--network_def#num_heads", "4", "--network_def#channel_multipliers", "[1,2,4,8]",
        "--patch_size", "[16,16,16]", "--batch_size", "2", "--amp", "False",
        "--total_iterations", "4", "--eval_every", "4", "--checkpoint_every", "4",
        "--num_workers", "0", "--cache_workers", "1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stderr[-12000:-3000]
    report = json.loads((output_dir / "validation_report.json").read_text())
    assert set(report["per_class"]["val_held_out_dice"]) == {"Prostate/lesion"}
    seen = set(report["per_class"]["val_seen_dice"])
    assert {"isic/lesion", "Liver/liver", "covid/lung", "Prostate/gland"} <= seen


def test_2d_query_gives_a_2d_mask_in_its_format(prepared: dict[str, Path], tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow

    net = build_iris_net(base_channels=4, num_heads=4, num_query_tokens=3, channel_multipliers=[1, 2, 4, 8])
    torch.save(net.state_dict(), tmp_path / "model.pt")
    content = json.loads(prepared["folder2d"].read_text())
    root = prepared["folder2d"].parent
    reference, query = content["training"][0], str(root / content["validation"][0]["image"])
    configs = REPO_ROOT / "bundle" / "configs"
    workflow = ConfigWorkflow(
        config_file=str(configs / "inference.json"),
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(REPO_ROOT / "bundle"),
        ckpt_path=str(tmp_path / "model.pt"),
        output_dir=str(tmp_path / "out"),
        query_images=[query],
        support_images=[str(root / reference["image"])],
        support_labels=[str(root / reference["label"])],
        classes={"lesion": 255},
        modality="dermoscopy",
        patch_size=[16, 16, 16],
        base_channels=4,
        num_heads=4,
        num_query_tokens=3,
        channel_multipliers=[1, 2, 4, 8],
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    mask = Image.open(tmp_path / "out" / f"{Path(query).stem}_seg.png")
    assert mask.size == Image.open(query).size and mask.mode == "L"
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert Path(summary["queries"][0]["segmentation"]).is_file()
    assert (tmp_path / "out" / f"{Path(query).stem}_preview.png").is_file()


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (REPO_ROOT / "bundle" / "configs" / "presets").glob("*.json"))
)
def test_presets_overlay_train_json(preset: str) -> None:
    from monai.bundle import ConfigParser

    from scripts.segmentation.losses import FocalLoss

    path = REPO_ROOT / "bundle" / "configs" / "presets" / f"{preset}.json"
    assert path.read_text() == json.dumps(json.loads(path.read_text()), indent=4) + "\n"
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "bundle" / "configs" / "train.json"), str(path)])
    assert parser.get_parsed_content("warmup_iterations") < parser.get_parsed_content("total_iterations")
    loss = parser.get_parsed_content("loss_function")
    assert isinstance(loss, FocalLoss) == (preset in ("brain_tumor", "drive"))


def test_jpeg_masks_are_binarised_into_png_label_maps(tmp_path: Path) -> None:
    root = _png_folder(tmp_path / "kvasir")
    for mask in sorted((root / "labels").glob("*.png")):
        Image.open(mask).convert("RGB").save(mask.with_suffix(".jpg"), quality=70)  # lossy, RGB, values near 0/255
        mask.unlink()
    path = prepare_datasets.prepare(
        str(root), "folder2d", str(tmp_path / "out"), modality="endoscopy", labels={1: "polyp"}, label_suffix="_mask",
        mask_threshold=128,
    )  # fmt: skip
    content = json.loads(path.read_text())
    labels = [path.parent / entry["label"] for entry in content["training"] + content["validation"]]
    assert all(label.parent == tmp_path / "out" / "labels" and label.suffix == ".png" for label in labels)
    assert set(np.unique(np.asarray(Image.open(labels[0]))).tolist()) == {0, 1}
