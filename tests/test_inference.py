"""inference.json: every strategy, output geometry, embeddings reuse and files, and bad inputs."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.transforms import Invertd
from PIL import Image
from scipy import ndimage

from scripts.data import image_io
from scripts.data.image_io import QueryFilesError, query_files, quiet_nvimagecodec_notices, unreadable_reason
from scripts.data.transforms import InvertedLabelMapd, KeepLargestComponentd, label_map
from scripts.drawing import overlay_panels, preview
from scripts.errors import user_error
from scripts.inference.task_setup import resolve_classes
from scripts.networks import build_iris_net, extra_state
from scripts.segmentation.inferers import InContextInferer
from scripts.segmentation.mirroring import mirrored
from scripts.segmentation.model_io import training_settings
from scripts.segmentation.support import SupportSetError, load_references, preprocessing
from scripts.segmentation.task_embeddings import tuning_patches

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundle" / "configs"
SIZE = {"base_channels": 4, "num_heads": 4, "num_query_tokens": 3, "channel_multipliers": [1, 2, 4, 8]}
CLASSES = {"sphere": 1, "box": 3}
PATCH = (32, 32, 32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, demo_dataset: Path) -> Path:
    """A tiny network with two memory-bank classes, saved as the bundle saves ``model.pt``: with the settings that
    training records (32³ patches, native spacing), which every test below relies on instead of size flags."""
    torch.manual_seed(0)
    net = build_iris_net(**SIZE, settings=training_settings([str(demo_dataset)], [32, 32, 32], None))
    net.memory_bank.update(["IrisDemo/sphere", "IrisDemo/box"], torch.randn(2, *net.memory_bank.embeddings.shape[1:]))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def demo(demo_dataset: Path) -> dict:
    content = json.loads(demo_dataset.read_text())
    root = demo_dataset.parent
    return {
        "support_images": [str(root / content["training"][i]["image"]) for i in range(2)],
        "support_labels": [str(root / content["training"][i]["label"]) for i in range(2)],
        "queries": [str(root / item["image"]) for item in content["validation"]],
    }


def inference_workflow(checkpoint: Path, output_dir: Path, **overrides) -> ConfigWorkflow:
    """inference.json with ``overrides``, initialised but not run: its objects can be looked at before running."""
    options = {
        "bundle_root": str(REPO_ROOT / "bundle"),
        "ckpt_path": str(checkpoint),
        "output_dir": str(output_dir),
        "sw_batch_size": 4,
        **overrides,
    }
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="infer",
        **options,
    )
    workflow.initialize()
    return workflow


def run_inference(checkpoint: Path, output_dir: Path, **overrides) -> ConfigWorkflow:
    workflow = inference_workflow(checkpoint, output_dir, **overrides)
    workflow.run()
    workflow.finalize()
    return workflow


def assert_label_map_like(query: str, segmentation: Path, allowed: set[int]) -> np.ndarray:
    source, result = nib.load(query), nib.load(segmentation)
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-4)
    values = np.asarray(result.dataobj)
    found = set(np.unique(values).tolist())
    assert found <= allowed and len(found) >= 2, found  # the classes' values only, and not one constant
    return values


def test_infer_config_has_every_property() -> None:
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        workflow_type="infer",
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


@pytest.mark.parametrize("strategy", ["one_shot", "ensemble", "retrieval", "tuning", "memory"])
def test_every_strategy_writes_valid_label_maps(strategy: str, checkpoint: Path, demo: dict, tmp_path: Path) -> None:
    support = {} if strategy == "memory" else {k: demo[k] for k in ("support_images", "support_labels")}
    classes = ["IrisDemo/sphere", "IrisDemo/box"] if strategy == "memory" else CLASSES
    workflow = run_inference(
        checkpoint, tmp_path, strategy=strategy, classes=classes, query_images=demo["queries"], tuning_steps=5,
        tuning_lr=0.05, **support,
    )  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategy"] == strategy and len(summary["queries"]) == len(demo["queries"])
    allowed = {0, 1, 2} if strategy == "memory" else {0, 1, 3}
    segmented = set()
    for query, entry in zip(demo["queries"], summary["queries"]):
        assert entry["query"] == query
        values = assert_label_map_like(query, Path(entry["segmentation"]), allowed)
        assert set(entry["classes"]) == set(classes)  # every requested class is reported, found or not
        for name, stats in entry["classes"].items():
            assert stats["voxels"] == int((values == stats["label_value"]).sum())
            segmented |= {name} if stats["voxels"] else set()
            assert stats["volume_ml"] == pytest.approx(stats["voxels"] * 1.5**3 / 1000, rel=1e-3)
        preview = Image.open(entry["segmentation"].replace("_seg.nii.gz", "_preview.png"))
        assert preview.width >= 512 and preview.height > preview.width / 3  # panels and a legend line per class
    assert segmented == set(classes)  # each class is segmented in some query: not an empty or a one-class output
    if strategy == "tuning":
        losses = workflow.parser.get_parsed_content("task_setup").tuning_losses
        assert len(losses) == 5 and losses[-1] < losses[0]


def test_keep_largest_component_leaves_each_class_one_object(checkpoint: Path, demo: dict, tmp_path: Path) -> None:
    """``keep_largest_component``: every class of the written label map is one connected object, a subset of what it
    was without the option (the tiny untrained network's classes are scattered), and summary.json counts what is
    written."""
    options = {"classes": CLASSES, "query_images": demo["queries"][:1], "save_previews": False}
    options.update({k: demo[k] for k in ("support_images", "support_labels")})
    maps = {}
    for keep in (False, True):
        run_inference(checkpoint, tmp_path / str(keep), keep_largest_component=keep, **options)
        (entry,) = json.loads((tmp_path / str(keep) / "summary.json").read_text())["queries"]
        maps[keep] = assert_label_map_like(demo["queries"][0], Path(entry["segmentation"]), {0, 1, 3})
        for stats in entry["classes"].values():
            assert stats["voxels"] == int((maps[keep] == stats["label_value"]).sum())
    components = {keep: [ndimage.label(labels == v)[1] for v in CLASSES.values()] for keep, labels in maps.items()}
    assert max(components[False]) > 1 and components[True] == [1, 1], components
    kept = maps[True] != 0
    np.testing.assert_array_equal(maps[True][kept], maps[False][kept])  # only removes voxels


def test_label_map_from_resampled_probabilities_matches_resampling_all_classes_at_once(tmp_path: Path) -> None:
    """``InvertedLabelMapd`` takes each class's probabilities back to the query's 1 mm grid one class at a time: the
    same label map as resampling the K-channel probabilities together, in the query's geometry."""
    path = tmp_path / "query.nii.gz"
    affine = np.array([[-1.0, 0, 0, 10], [0, 1, 0, -5], [0, 0, 1, 3], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(30, 26, 22)).astype(np.float32), affine), path)
    transform = preprocessing("MRI", [2.0, 2.0, 2.0], ["image"], track_meta=True)
    query = transform({"image": str(path)})["image"]
    logits = MetaTensor(torch.randn(3, *query.shape[1:]).half() * 4, meta=query.meta)
    values = [2, 5, 9]
    result = InvertedLabelMapd("pred", transform, "image", values)({"pred": logits, "image": query})["pred"]
    assert tuple(result.shape[1:]) == (30, 26, 22) and result.dtype == torch.int16
    np.testing.assert_allclose(result.affine.numpy(), affine, atol=1e-5)
    together = Invertd("pred", transform, orig_keys="image", nearest_interp=False)(
        {"pred": MetaTensor(torch.sigmoid(logits.float()), meta=query.meta), "image": query}
    )["pred"]
    expected = label_map(together.as_tensor(), torch.tensor(values, dtype=torch.int16), threshold=0.5)
    np.testing.assert_array_equal(result.numpy(), expected.numpy())
    assert set(np.unique(result.numpy())) == {0, *values}


def test_keep_largest_component_keeps_values_dtype_and_geometry() -> None:
    labels = np.zeros((1, 6, 6, 6), dtype=np.int16)
    labels[0, :2, :2, :2] = 3  # 8 voxels
    labels[0, 5, 5, 5] = 3  # a second object of class 3
    labels[0, 3:5, 0, 0] = 7  # class 7: one object of 2 voxels
    labels[0, 0, 5, 5] = 7  # and one of 1
    image = MetaTensor(torch.as_tensor(labels), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    result = KeepLargestComponentd("pred")({"pred": image})["pred"]
    assert isinstance(result, MetaTensor) and result.dtype == torch.int16
    torch.testing.assert_close(result.affine, image.affine)
    expected = labels.copy()
    expected[0, 5, 5, 5] = expected[0, 0, 5, 5] = 0
    np.testing.assert_array_equal(result.numpy(), expected)


def test_threshold_from_reference_volume_only_grows_objects_and_travels_with_the_embeddings(
    checkpoint: Path, demo: dict, tmp_path: Path
) -> None:
    """``threshold_from_reference_volume`` (whose thresholds ``test_volume_calibration.py`` checks): each class's volume
    is its mean over the references that label it, summary.json gives each class's threshold (between the floor and
    0.5), the label map keeps every voxel of the one at 0.5, and an embeddings file written with it carries the
    references' volumes, so that segmenting from the file alone gives the same map; the memory bank, which has no
    references, is refused, and so is the embeddings file asked for its classes in another order."""
    options = {"classes": CLASSES, "query_images": demo["queries"][:1], "save_previews": False}
    support = {k: demo[k] for k in ("support_images", "support_labels")}
    calibrated = {"threshold_from_reference_volume": True, "lowest_threshold": 0.2}
    embeddings = str(tmp_path / "task.pt")
    run_inference(checkpoint, tmp_path / "plain", **options, **support)
    workflow = run_inference(
        checkpoint, tmp_path / "calibrated", embeddings_file=embeddings, **calibrated, **options, **support
    )
    run_inference(checkpoint, tmp_path / "from_file", embeddings_file=embeddings, **calibrated, **options)
    maps, thresholds = {}, {}
    for run in ("plain", "calibrated", "from_file"):
        (entry,) = json.loads((tmp_path / run / "summary.json").read_text())["queries"]
        maps[run] = assert_label_map_like(demo["queries"][0], Path(entry["segmentation"]), {0, 1, 3})
        thresholds[run] = [stats.get("threshold") for stats in entry["classes"].values()]
    assert thresholds["plain"] == [None, None]
    assert (
        all(0.2 <= t <= 0.5 for t in thresholds["calibrated"]) and thresholds["from_file"] == thresholds["calibrated"]
    )
    assert ((maps["calibrated"] != 0) | (maps["plain"] == 0)).all()  # a voxel labelled at 0.5 stays labelled
    np.testing.assert_array_equal(maps["from_file"], maps["calibrated"])
    labels = [nib.load(path) for path in demo["support_labels"]]
    expected = []  # each class's mean volume (mm³) over the references that label it, from the files themselves
    for value in CLASSES.values():
        counts = [int((np.asarray(label.dataobj) == value).sum()) for label in labels]
        expected.append(
            np.mean([n * abs(np.linalg.det(label.affine[:3, :3])) for n, label in zip(counts, labels) if n])
        )
    volumes = workflow.parser.get_parsed_content("inferer").calibration.volumes
    np.testing.assert_allclose(volumes, expected, rtol=1e-5)
    np.testing.assert_allclose(torch.load(embeddings, weights_only=True)["reference_volumes"], expected, rtol=1e-5)
    memory = {"strategy": "memory", "classes": ["IrisDemo/sphere"], "query_images": demo["queries"][:1]}
    with pytest.raises(Exception) as error:
        run_inference(checkpoint, tmp_path / "memory", **memory, **calibrated)
    assert "threshold_from_reference_volume needs references" in chained_messages(error.value)
    reordered = {**options, "classes": dict(reversed(CLASSES.items()))}  # the file's channels follow its own order
    with pytest.raises(Exception) as error:
        run_inference(checkpoint, tmp_path / "reordered", embeddings_file=embeddings, **reordered)
    assert "in the same order" in chained_messages(error.value)


def test_support_is_encoded_once_for_all_windows_and_queries(checkpoint: Path, demo: dict, tmp_path: Path) -> None:
    support = {k: demo[k] for k in ("support_images", "support_labels")}
    workflow = inference_workflow(checkpoint, tmp_path, classes=CLASSES, query_images=demo["queries"], **support)
    network = workflow.parser.get_parsed_content("network")
    assert workflow.parser.get_parsed_content("evaluator").network is network  # the network the run will use
    calls = []  # the batch size of every TaskEncoder call of this run's network
    network.task_encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    workflow.run()
    workflow.finalize()
    assert (tmp_path / "summary.json").is_file()
    labels = [np.asarray(nib.load(path).dataobj) for path in demo["support_labels"]]
    pairs = sum(int((label == value).any()) for label in labels for value in CLASSES.values())
    assert pairs >= 3 and calls[0] == pairs  # one batched encoding of every (reference, class) pair, none per window
    # then the match check: per query, one batched encoding of the objects it found, none per window
    assert len(calls) == 1 + len(demo["queries"]) and all(1 <= n <= len(CLASSES) for n in calls[1:])


def test_embeddings_file_round_trip(checkpoint: Path, demo: dict, tmp_path: Path) -> None:
    embeddings = tmp_path / "task.pt"
    support = {k: demo[k] for k in ("support_images", "support_labels")}
    run_inference(
        checkpoint,
        tmp_path / "a",
        strategy="ensemble",
        classes=CLASSES,
        query_images=demo["queries"][:1],
        embeddings_file=str(embeddings),
        **support,
    )
    content = torch.load(embeddings, weights_only=True)
    assert content["classes"] == CLASSES and content["embeddings"].shape == (1, 2, *build_iris_net(**SIZE).token_shape)
    run_inference(
        checkpoint,
        tmp_path / "b",
        strategy="ensemble",
        query_images=demo["queries"][:1],
        embeddings_file=str(embeddings),
    )
    name = Path(demo["queries"][0]).name.replace(".nii.gz", "_seg.nii.gz")
    first = np.asarray(nib.load(tmp_path / "a" / name).dataobj)
    second = np.asarray(nib.load(tmp_path / "b" / name).dataobj)
    np.testing.assert_array_equal(first, second)


def test_output_geometry_follows_anisotropic_oblique_non_ras_queries(checkpoint: Path, demo: dict, tmp_path: Path):
    source = nib.load(demo["queries"][0])
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.9, -1.3, 2.5])  # LPS-like flips, anisotropic, oblique
    affine[:3, 3] = [12.0, -40.0, 7.5]
    query = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[:, :, :30], affine), query)
    state = torch.load(checkpoint, weights_only=True)
    settings = extra_state.decode(state["_extra_state"])
    state["_extra_state"] = extra_state.encode({**settings, "target_spacing": [1.5, 1.5, 1.5]})  # queries resampled
    resampling = tmp_path / "model_1.5mm.pt"
    torch.save(state, resampling)
    run_inference(
        resampling,
        tmp_path / "out",
        classes=CLASSES,
        query_images=[str(query)],
        **{k: demo[k] for k in ("support_images", "support_labels")},
    )
    assert_label_map_like(str(query), tmp_path / "out" / "oblique_seg.nii.gz", {0, 1, 3})


def chained_messages(error: BaseException) -> str:
    """Messages of an exception and its causes (MONAI wraps errors raised inside config expressions)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def test_bad_inputs_are_named_before_heavy_work(checkpoint: Path, demo: dict, tmp_path: Path) -> None:
    support = {k: demo[k] for k in ("support_images", "support_labels")}
    other = tmp_path / "other.pt"
    torch.save({"classes": CLASSES, "embeddings": torch.zeros(1, 2, 9, 80)}, other)
    cases = [
        ({"strategy": "best", "classes": CLASSES, **support}, ["Unknown strategy 'best'"]),
        ({"classes": {"ghost": 42}, **support}, ["class 'ghost' (label value 42)", demo["support_labels"][0]]),
        ({"classes": CLASSES, "strategy": "one_shot"}, ["needs support_images"]),
        ({"classes": CLASSES}, ["not in the memory bank", "IrisDemo/sphere"]),  # no references: the memory bank
        ({"classes": CLASSES, "embeddings_file": str(other)}, ["different network size", str(other)]),
        ({"classes": CLASSES, "support_images": [str(tmp_path / "nowhere.nii.gz")], "support_labels": [str(other)]},
         ["not found", "nowhere.nii.gz"]),
        ({"classes": CLASSES, "base_channels": 8, **support},
         [f"{checkpoint} was trained with base_channels 4, but 8 was asked for", "use the model's base_channels"]),
        ({"classes": CLASSES, "patch_size": [64, 64, 64], **support},
         ["was trained with patch_size [32, 32, 32], but [64, 64, 64] was asked for"]),
        ({"classes": CLASSES, "ckpt_path": str(other), **support}, [f"{other} holds no network weights"]),
        ({"classes": CLASSES, "query_images": str(tmp_path / "scans_typo" / "*.nii.gz"), **support},
         ["No query image matches", "scans_typo"]),
        ({"classes": CLASSES, "query_images": [demo["queries"][0], str(tmp_path / "gone.nii.gz")], **support},
         ["Query images not found", "gone.nii.gz"]),
    ]  # fmt: skip
    for overrides, expected in cases:
        with pytest.raises(Exception) as error:
            run_inference(checkpoint, tmp_path / "out", **{"query_images": demo["queries"], **overrides})
        messages = chained_messages(error.value)
        assert all(text in messages for text in expected), messages
        assert not (tmp_path / "out" / "summary.json").exists()  # failed before segmenting anything


def test_a_training_checkpoint_segments_as_its_model_does(checkpoint: Path, demo: dict, tmp_path: Path) -> None:
    """``checkpoint_*.pt`` (network, optimizer, ... as training saves it) works wherever ``model.pt`` does."""
    training_checkpoint = tmp_path / "checkpoint_00000100.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({"network": state, "optimizer": {}, "trainer": {"iteration": 100}}, training_checkpoint)
    options = {"query_images": demo["queries"][:1], "classes": CLASSES, "save_probabilities": True}
    support = {k: demo[k] for k in ("support_images", "support_labels")}
    run_inference(checkpoint, tmp_path / "model", **options, **support)
    run_inference(training_checkpoint, tmp_path / "checkpoint", **options, **support)
    (model_prob,) = (tmp_path / "model").glob("*_prob.nii.gz")
    (checkpoint_prob,) = (tmp_path / "checkpoint").glob("*_prob.nii.gz")
    probabilities = nib.load(model_prob).get_fdata()
    assert probabilities.std() > 0  # a real prediction, not a constant
    np.testing.assert_array_equal(probabilities, nib.load(checkpoint_prob).get_fdata())


@pytest.mark.parametrize("options", [{"cpu_thresh": 0}, {"stitch_dtype": "float16"}])
def test_stitching_options_keep_the_result(options: dict) -> None:
    """CPU stitching gives the same logits; a float16 buffer the same logits up to rounding and the same label map."""
    torch.manual_seed(0)
    net = build_iris_net(**SIZE).eval()
    volume, embeddings = torch.randn(1, 1, 40, 36, 24), torch.randn(1, 2, *net.token_shape)
    logits = []
    for kwargs in ({}, options):
        inferer = InContextInferer((16, 16, 16), sw_batch_size=2, **kwargs)
        inferer.set_task(embeddings)
        with torch.no_grad():
            logits.append(inferer(volume, net))
    reference, result = logits
    assert reference.shape == result.shape == (1, 2, 40, 36, 24)
    if "cpu_thresh" in options:
        torch.testing.assert_close(result, reference)
        return
    assert result.dtype == torch.float16
    torch.testing.assert_close(result.float(), reference, rtol=0, atol=0.02 * float(reference.abs().max()))
    labels = [label_map(x[0], torch.tensor([1, 2])) for x in (reference, result.float())]
    assert (labels[0] == labels[1]).float().mean() > 0.999


def test_bad_stitch_dtype_is_named() -> None:
    with pytest.raises(ValueError, match="'float17'"):
        InContextInferer((16, 16, 16), stitch_dtype="float17")


def test_mirroring_averages_the_mirrored_windows() -> None:
    """A predictor that adds a ramp along D: mirroring D averages the ramp out; axes of size 1 are not mirrored."""
    calls = []

    def ramp(window: torch.Tensor) -> torch.Tensor:
        calls.append(window.shape)
        return window + torch.arange(window.shape[2], dtype=window.dtype).view(1, 1, -1, 1, 1)

    window = torch.randn(2, 1, 6, 5, 1)
    torch.testing.assert_close(mirrored(ramp, [0])(window), window + 2.5)  # (0 + 5) / 2 everywhere
    calls.clear()
    torch.testing.assert_close(mirrored(ramp, [0, 1, 2])(window), window + 2.5)
    assert len(calls) == 4  # D and H mirrored, each alone and together; W has size 1
    assert mirrored(ramp, []) is ramp
    with pytest.raises(ValueError, match=r"mirror_axes .* \[0, 3\]"):
        InContextInferer((16, 16, 16), mirror_axes=[0, 3])


def test_mirrored_inference_keeps_shapes_and_changes_the_logits() -> None:
    torch.manual_seed(0)
    net = build_iris_net(**SIZE).eval()
    volume, embeddings = torch.randn(1, 1, 40, 32, 24), torch.randn(1, 2, *net.token_shape)
    logits = []
    for axes in ([], [0, 1, 2]):
        inferer = InContextInferer((16, 16, 16), sw_batch_size=2, mirror_axes=axes)
        inferer.set_task(embeddings)
        with torch.no_grad():
            logits.append(inferer(volume, net))
    assert logits[0].shape == logits[1].shape == (1, 2, 40, 32, 24)
    assert not torch.allclose(logits[0], logits[1])  # an untrained network is not mirror-symmetric
    mirrored_volume = volume.flip(2, 3, 4)  # the window grid is symmetric for these sizes
    inferer.set_task(embeddings)
    with torch.no_grad():
        again = inferer(mirrored_volume, net).flip(2, 3, 4)
    torch.testing.assert_close(again, logits[1], rtol=1e-4, atol=1e-4)  # the average is mirror-equivariant


def test_unreadable_queries_are_named_before_any_is_segmented_or_skipped(
    checkpoint: Path, demo: dict, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(Path(demo["queries"][0]).read_bytes()[:5000])  # as a copy cut short
    queries = [demo["queries"][0], str(truncated), demo["queries"][1]]
    options = {"classes": CLASSES, **{k: demo[k] for k in ("support_images", "support_labels")}}
    with pytest.raises(Exception) as error:
        run_inference(checkpoint, tmp_path / "stopped", query_images=queries, **options)
    assert "Unreadable query images" in chained_messages(error.value) and str(truncated) in chained_messages(
        error.value
    )
    assert not (tmp_path / "stopped").exists()
    run_inference(checkpoint, tmp_path / "skipped", query_images=queries, skip_invalid=True, **options)
    summary = json.loads((tmp_path / "skipped" / "summary.json").read_text())
    assert [entry["query"] for entry in summary["queries"]] == [demo["queries"][0], demo["queries"][1]]
    assert list(summary["skipped"]) == [str(truncated)] and "gzip" in summary["skipped"][str(truncated)]


def test_broken_headers_and_short_data_are_found_before_loading(demo: dict, tmp_path: Path) -> None:
    """A valid gzip stream can still hold a broken NIfTI header or too little data: both are named up front."""
    good = gzip.decompress(Path(demo["queries"][0]).read_bytes())
    cases = {
        "header.nii.gz": gzip.compress(b"\0" * 348 + good[348:]),  # the header zeroed, the gzip stream intact
        "short.nii.gz": gzip.compress(good[: len(good) // 2]),  # half the voxels
        "short.nii": good[: len(good) - 10],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    reasons = query_files(str(tmp_path), skip_invalid=True).skipped
    assert "broken NIfTI header" in reasons[str(tmp_path / "header.nii.gz")]
    assert (
        "cut short" in reasons[str(tmp_path / "short.nii.gz")] and "cut short" in reasons[str(tmp_path / "short.nii")]
    )
    with pytest.raises(QueryFilesError, match="or pass --skip_invalid True"):  # as the bundle's switches take it
        query_files(str(tmp_path))
    assert unreadable_reason(demo["queries"][0]) is None
    (tmp_path / "whole.nii").write_bytes(good)
    assert unreadable_reason(tmp_path / "whole.nii") is None
    label = str(tmp_path / "short.nii.gz")  # a broken reference label is named before any reference is loaded
    with pytest.raises(SupportSetError, match=f"Unreadable support files: {label}: NIfTI data cut short"):
        load_references(demo["support_images"][:1], [label], CLASSES)


def test_nvimagecodec_notices_are_dropped_once_asked_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    monkeypatch.setattr(plugin_log, "filters", [])
    monkeypatch.setattr(image_io, "is_nvimgcodec_available", lambda: False)  # as on a machine without it
    notice, other = (
        plugin_log.makeRecord(plugin_log.name, logging.WARNING, __file__, 0, message, None, None)
        for message in ("nvImageCodec is not available; skipping pydicom decoder plugin registration.", "other")
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_nvimagecodec_notices()
        quiet_nvimagecodec_notices()  # entry points may call it twice
        warnings.warn("NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register successfully.")
        warnings.warn("another warning")
    assert len(plugin_log.filters) == 1 and not plugin_log.filter(notice) and plugin_log.filter(other)
    assert [str(warning.message) for warning in caught] == ["another warning"]


def test_tuning_supervises_every_class_a_reference_labels(demo: dict, tmp_path: Path) -> None:
    """Each reference patch is a target for every class its label map holds (negatives included), and for no other."""
    first, partial = (nib.load(path) for path in demo["support_labels"])
    values = np.asarray(partial.dataobj).copy()
    both = sorted(set(np.unique(values).tolist()) & set(np.unique(np.asarray(first.dataobj)).tolist()) - {0})
    classes = {"a": both[0], "b": both[1]}
    values[values == classes["b"]] = 0  # the second reference does not label "b"
    nib.save(nib.Nifti1Image(values, partial.affine, partial.header), tmp_path / "partial.nii.gz")
    label_files = [demo["support_labels"][0], str(tmp_path / "partial.nii.gz")]
    references = load_references(demo["support_images"], label_files, classes)
    labels = list(classes.values())
    per_class = [[r for r in references if value in r.subject.foreground] for value in labels]
    assert [len(r) for r in per_class] == [2, 1]
    images, masks, labelled = tuning_patches(per_class, labels, PATCH)
    assert images.shape == (3, 1, *PATCH) and masks.shape == (3, 2, *PATCH)
    assert labelled.tolist() == [[True, True], [True, False], [True, True]]  # a: both references; b: the first
    for n, (k, reference) in enumerate([(0, references[0]), (0, references[1]), (1, references[0])]):
        image, own = reference.patch(labels[k], PATCH)
        assert torch.equal(images[n], image) and torch.equal(masks[n, k], own[0].float())
    assert masks[0, 1].sum() < masks[2, 1].sum()  # b on a's patch: a partial or empty target


def test_query_files_expand_folders_and_globs(demo: dict, tmp_path: Path) -> None:
    folder = Path(demo["queries"][0]).parent
    in_folder = query_files(str(folder)).files
    assert set(demo["queries"]) <= set(in_folder) and in_folder == sorted(in_folder)
    assert query_files(str(folder / "*.nii.gz")).files == [path for path in in_folder if path.endswith(".nii.gz")]
    assert query_files(demo["queries"][:1]).files == demo["queries"][:1]
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="No query image matches"):
        query_files(str(tmp_path))  # a folder without images


@pytest.mark.slow
def test_a_user_error_ends_the_command_with_its_message(checkpoint: Path, tmp_path: Path) -> None:
    """No config-expression traceback for a mistake the user can fix: one message and exit status 1."""
    for command in (
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/inference.json",
         "--bundle_root", "bundle", "--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "out"),
         "--query_images", f"'{tmp_path}/scans_typo/*.nii.gz'"],
        [sys.executable, "scripts/segment.py", "--query", str(tmp_path / "scans_typo"), "--out", str(tmp_path / "out"),
         "--ckpt", str(checkpoint), "--strategy", "memory"],
    ):  # fmt: skip
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=os.environ)
        assert result.returncode == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "scans_typo" in result.stderr.splitlines()[-2]
        assert result.stderr.splitlines()[-2].startswith("Error: ")
    assert not (tmp_path / "out").exists()


def test_user_errors_are_found_inside_the_errors_that_wrap_them() -> None:
    try:
        try:
            raise SupportSetError("class 'ghost' is not in ref.nii.gz")
        except SupportSetError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression") from inner
    except RuntimeError as outer:
        assert str(user_error(outer)) == "class 'ghost' is not in ref.nii.gz"
    assert user_error(RuntimeError("a bug")) is None


def test_memory_classes_keep_their_dataset_label_values() -> None:
    labels = {"IrisDemo/fluid_round": 1, "IrisDemo/dense_plate": 10}
    both = ["IrisDemo/dense_plate", "IrisDemo/fluid_round"]
    assert resolve_classes(both, "memory", dataset_labels=labels) == {
        "IrisDemo/dense_plate": 10,
        "IrisDemo/fluid_round": 1,
    }
    unknown = ["IrisDemo/dense_plate", "Other/liver"]  # a value is unknown: 1..K for all, never a collision
    assert resolve_classes(unknown, "memory", dataset_labels=labels) == {"IrisDemo/dense_plate": 1, "Other/liver": 2}


def test_previews_show_the_reference_above_the_query(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((40, 40, 30)).astype(np.float32)
    labels = np.zeros((40, 40, 30), np.int16)
    labels[10:20, 10:20, 10:20], labels[25:30, 25:30, 5:15] = 1, 10
    classes = {"fluid_round": 1, "dense_plate": 10}
    preview(image, labels, classes, tmp_path / "query.png")
    preview(image, labels, classes, tmp_path / "both.png", ("ref.nii.gz", overlay_panels(image, labels, [1, 10])))
    alone, both = Image.open(tmp_path / "query.png"), Image.open(tmp_path / "both.png")
    assert alone.width >= 512 and both.width == alone.width and both.height > 1.5 * alone.height - 100
    legend = np.asarray(alone)[-40:]  # the legend lines hold each class's colour
    assert all((legend == colour).all(-1).any() for colour in ((230, 25, 75), (60, 180, 75)))


def test_a_workflow_run_again_on_another_query_keeps_its_weights_and_task(
    checkpoint: Path, demo: dict, tmp_path: Path
) -> None:
    """What the MONAI Label app does between requests: swap the query, run again. The weights are not reloaded, the
    task embeddings not recomputed, and the label map is the one a fresh run writes."""
    options = {"classes": CLASSES, "strategy": "retrieval", "support_images": demo["support_images"],
               "support_labels": demo["support_labels"], "save_previews": False}  # fmt: skip
    kept = inference_workflow(checkpoint, tmp_path / "kept", query_images=demo["queries"][:1], **options)
    kept.run()
    loader, task = kept.parser.get_parsed_content("handlers")[:2]
    embeddings = kept.parser.get_parsed_content("inferer").task_embeddings
    kept.parser.get_parsed_content("dataset").data = [{"image": demo["queries"][1]}]
    kept.run()
    assert loader.loaded is not None and task.done
    assert kept.parser.get_parsed_content("inferer").task_embeddings is embeddings  # not computed again
    summary = json.loads((tmp_path / "kept" / "summary.json").read_text())
    assert [entry["query"] for entry in summary["queries"]] == [demo["queries"][1]]  # this run's query only
    run_inference(checkpoint, tmp_path / "fresh", query_images=demo["queries"][1:2], **options)
    name = Path(summary["queries"][0]["segmentation"]).name
    again, fresh = (np.asarray(nib.load(tmp_path / part / name).dataobj) for part in ("kept", "fresh"))
    assert np.array_equal(again, fresh)


def test_retrieval_among_no_more_references_than_it_keeps_segments_once(
    checkpoint: Path, demo: dict, tmp_path: Path
) -> None:
    """With one reference per class (MONAI Label's "label one"), retrieval would choose that reference again: it
    answers with its first pass, the one-shot result, at the one-shot cost."""
    support = {"support_images": demo["support_images"][:1], "support_labels": demo["support_labels"][:1]}
    outputs, passes = {}, {}
    for strategy in ("one_shot", "retrieval"):
        workflow = inference_workflow(checkpoint, tmp_path / strategy, classes=CLASSES, strategy=strategy,
                                      query_images=demo["queries"][:1], save_previews=False, **support)  # fmt: skip
        calls = []
        workflow.parser.get_parsed_content("network").register_forward_pre_hook(lambda *_: calls.append(1))
        workflow.run()
        workflow.finalize()
        passes[strategy] = len(calls)
        name = Path(demo["queries"][0]).name.replace(".nii.gz", "_seg.nii.gz")
        outputs[strategy] = np.asarray(nib.load(tmp_path / strategy / name).dataobj)
    assert passes["retrieval"] == passes["one_shot"] > 0
    np.testing.assert_array_equal(outputs["retrieval"], outputs["one_shot"])
