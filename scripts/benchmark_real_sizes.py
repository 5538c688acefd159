"""What real volume sizes cost: seconds per training episode and per inference, on volumes of real-scan size.

Example::

    python scripts/benchmark_real_sizes.py --output real_sizes.json [--brains data/brains/dataset.json]

Synthetic volumes of three sizes (labelled blobs; the cost does not depend on what the voxels show): the demo's
64x64x48 at 1.5 mm, a 1 mm human-brain-size volume (197x233x189, 26 structures) and a 512x512x300 CT-like volume of
0.8x0.8x1.0 mm resampled to 1.5 mm (274x274x200). For each, the seconds of one training episode
(``EpisodeDataset[i]``, built as a DataLoader worker builds it) with the demo preset (32³ patches) and the paper preset
(128³ patches), with the pool in memory and on disk; the CPU seconds of one-shot inference with the demo network (the
brain also with mirrored windows), the seconds per class of the match check, and the seconds from logits to the label
map on the query's grid (each class's probabilities resampled, against a label map resampled with nearest neighbours,
for the brain at the CPU preset's 1.6 mm and the CT volume); and the data-wait fraction that the
paper preset's batch of 32 episodes would have with 8 DataLoader workers, from the episode cost and the recorded H200
step.
``--brains`` adds the same measurements on a real dataset.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent / "bundle"))

from scripts.data.episodes import EpisodeDataset  # noqa: E402
from scripts.data.pool import DatasetPool  # noqa: E402
from scripts.data.transforms import InvertedLabelMapd, label_map  # noqa: E402
from scripts.networks import build_iris_net  # noqa: E402
from scripts.performance import channels_last  # noqa: E402
from scripts.segmentation.inferers import InContextInferer  # noqa: E402
from scripts.segmentation.match import cycle_dice  # noqa: E402
from scripts.segmentation.model_io import DEFAULT_SETTINGS  # noqa: E402
from scripts.segmentation.support import preprocessing  # noqa: E402

VOLUMES = {  # name: shape, spacing (mm), structures, target spacing
    "demo": ((64, 64, 48), (1.5, 1.5, 1.5), 12, None),
    "brain_1mm": ((197, 233, 189), (1.0, 1.0, 1.0), 26, None),
    "ct_512x512x300": ((512, 512, 300), (0.8, 0.8, 1.0), 15, (1.5, 1.5, 1.5)),
}
PRESETS = {"demo": (32, 32, 32), "paper": (128, 128, 128)}
LABEL_MAP_GRIDS = {"brain_1mm": (1.6, 1.6, 1.6), "ct_512x512x300": (1.5, 1.5, 1.5)}  # processing grid of the queries
DEMO_NETWORK = {key: DEFAULT_SETTINGS[key] for key in ("base_channels", "num_query_tokens", "channel_multipliers")}
H200_STEP_S = 0.248  # paper preset, 2 episodes per step (docs/benchmarks.md, run 2)
PAPER_BATCH, WORKERS = 32, 8


def write_dataset(root: Path, shape: tuple[int, ...], spacing: tuple[float, ...], structures: int) -> Path:
    """Three subjects (2 training, 1 validation) of ``shape`` with ``structures`` labelled ellipsoids."""
    rng = np.random.default_rng(0)
    affine = np.diag([*spacing, 1.0])
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    items = []
    for index in range(3):
        label = np.zeros(shape, dtype=np.uint8)
        for value in range(1, structures + 1):
            centre = rng.uniform(0.2, 0.8, 3) * np.array(shape)
            radii = rng.uniform(0.03, 0.08, 3) * np.array(shape)
            inside = sum(((axis - c) / r) ** 2 for axis, c, r in zip(grid, centre, radii)) <= 1
            label[inside] = value
        image = (rng.normal(0, 20, shape) + 40 * label).astype(np.int16)
        for kind, array in (("images", image), ("labels", label)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), root / kind / f"case{index}.nii.gz")
        items.append({"image": f"images/case{index}.nii.gz", "label": f"labels/case{index}.nii.gz"})
    labels = {"0": "background", **{str(v): f"s{v}" for v in range(1, structures + 1)}}
    content = {"name": root.name, "modality": {"0": "CT"}, "labels": labels, "training": items[:2],
               "validation": items[2:]}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(content))
    return root / "dataset.json"


def episode_seconds(pool: DatasetPool, patch: tuple[int, ...], episodes: int) -> float:
    """Median seconds to build one episode (4 classes, 1 shot, synthetic classes as train.json), single thread."""
    dataset = EpisodeDataset(pool, episodes + 1, patch, synthetic_class_prob=0.5, seed=0)
    dataset[0]  # warm-up
    times = []
    for index in range(1, episodes + 1):
        start = time.perf_counter()
        dataset[index]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def inference_seconds(volume: torch.Tensor, classes: int, mirror_axes: list[int]) -> float:
    """Seconds of one sliding-window one-shot inference of ``volume`` with the demo network, with inference.json's
    window settings (batch of 2 windows, float16 stitching, no autocast)."""
    network = channels_last(build_iris_net(**DEMO_NETWORK)).eval()
    inferer = InContextInferer((32, 32, 32), sw_batch_size=2, overlap=0.5, stitch_dtype="float16",
                               mirror_axes=mirror_axes)  # fmt: skip
    inferer.set_task(torch.randn(1, classes, *network.token_shape))
    start = time.perf_counter()
    inferer(volume[None].float(), network)
    return time.perf_counter() - start


@torch.no_grad()
def match_seconds_per_class(volume: torch.Tensor, classes: int) -> float:
    """Seconds per class of the match check (scripts/segmentation/match.py) on ``volume``, each class's object a
    16³ cube: two network passes on one 32³ patch per class, whatever the volume's size."""
    network = channels_last(build_iris_net(**DEMO_NETWORK)).eval()
    objects = torch.zeros(classes, *volume.shape[1:], dtype=torch.bool)
    centre = [n // 2 for n in volume.shape[1:]]
    objects[(slice(None), *(slice(c - 8, c + 8) for c in centre))] = True
    reference_images = torch.randn(classes, 1, 32, 32, 32)
    reference_masks = torch.zeros_like(reference_images)
    reference_masks[..., 8:24, 8:24, 8:24] = 1
    start = time.perf_counter()
    cycle_dice(network, volume.float(), objects, reference_images, reference_masks, (32, 32, 32))
    return (time.perf_counter() - start) / classes


def label_map_seconds(image: Path, target_spacing: tuple[float, ...], classes: int) -> dict[str, float]:
    """Seconds from ``classes`` logits on the processing grid to the label map on the query's grid: each class's
    probabilities resampled linearly (``InvertedLabelMapd``, as inference.json does) and, the baseline in the same
    process, the label map made on the grid and resampled with nearest neighbours (inference.json until 0.9.2)."""
    transform = preprocessing("CT", target_spacing, ["image"], track_meta=True)
    grid = transform({"image": str(image)})["image"]
    logits = MetaTensor(torch.randn(classes, *grid.shape[1:]).half(), meta=grid.meta)
    logits.applied_operations = grid.applied_operations
    values = list(range(1, classes + 1))
    start = time.perf_counter()
    labels = MetaTensor(label_map(logits.as_tensor(), torch.tensor(values, dtype=torch.int16)), meta=grid.meta)
    Invertd("pred", transform, orig_keys="image", nearest_interp=True)({"pred": labels, "image": grid})
    nearest = time.perf_counter() - start
    start = time.perf_counter()
    InvertedLabelMapd("pred", transform, "image", values)({"pred": logits, "image": grid})
    resampled = time.perf_counter() - start
    return {"nearest_label_map": round(nearest, 2), "resampled_probabilities": round(resampled, 2),
            "ratio": round(resampled / nearest, 1)}  # fmt: skip


def main(
    output: str = "real_sizes.json",
    episodes: int = 5,
    brains: str | None = None,
    threads: int = 1,
    inference_threads: int = 2,
    volumes: list[str] | None = None,
    parts: list[str] | None = None,
) -> None:
    """Measure and write the results (see the module docstring); episodes are built with ``threads`` torch threads,
    as one DataLoader worker builds them, inference runs with ``inference_threads``. Mirrored inference (8 passes per
    window) is measured on the brain; on the CT volume it costs the same factor. ``volumes``: a subset of the volume
    names (``demo``, ``brain_1mm``, ``ct_512x512x300``, ``real_brains``) to measure, ``parts`` a subset of ``episodes``,
    ``inference`` (with the match check) and ``label_map``."""
    parts = parts or ["episodes", "inference", "label_map"]
    results: dict = {"episode_seconds": {}, "inference_seconds": {}, "match_seconds_per_class": {},
                     "label_map_seconds": {}, "threads": threads}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        datasets = {
            name: (write_dataset(Path(work) / name, shape, spacing, count), target)
            for name, (shape, spacing, count, target) in VOLUMES.items()
        }
        if brains:
            datasets["real_brains"] = (Path(brains), None)
        for name, (path, target) in datasets.items():
            if volumes is not None and name not in volumes:
                continue
            for cache in ("memory", "disk") if "episodes" in parts else ():
                torch.set_num_threads(4)
                pool = DatasetPool([str(path)], "training", target, num_workers=2, cache=cache,
                                   cache_dir=str(Path(work) / "cache" / name))  # fmt: skip
                torch.set_num_threads(threads)
                for preset, patch in PRESETS.items():
                    seconds = episode_seconds(pool, patch, episodes)
                    results["episode_seconds"][f"{name}/{cache}/{preset}"] = round(seconds, 3)
                    print(f"episode {name} ({cache} cache) {preset} preset: {seconds:.3f} s", flush=True)
            if name in ("demo", "brain_1mm", "ct_512x512x300") and "inference" in parts:
                torch.set_num_threads(inference_threads)
                volume = DatasetPool([str(path)], "validation", target, num_workers=1).subjects[0].image
                seconds = match_seconds_per_class(volume, 6)
                results["match_seconds_per_class"][f"{name}/{tuple(volume.shape[1:])}"] = round(seconds, 3)
                print(f"match check {name}: {seconds:.3f} s per class", flush=True)
                for mirror in ([], [0, 1, 2]) if name == "brain_1mm" else ([],):  # 8 passes: see the brain's ratio
                    seconds = inference_seconds(volume, 6, mirror)
                    key = f"{name}/{tuple(volume.shape[1:])}/mirror_{len(mirror)}axes"
                    results["inference_seconds"][key] = round(seconds, 1)
                    print(f"inference {key}: {seconds:.1f} s", flush=True)
            if name in LABEL_MAP_GRIDS and "label_map" in parts:
                torch.set_num_threads(inference_threads)
                image = path.parent / "images" / "case2.nii.gz"
                timing = label_map_seconds(image, LABEL_MAP_GRIDS[name], 6)
                results["label_map_seconds"][f"{name}/6 classes/{LABEL_MAP_GRIDS[name][0]} mm"] = timing
                print(f"label map {name}: {timing}", flush=True)
    paper = max((value for key, value in results["episode_seconds"].items() if key.endswith("memory/paper")), default=0)
    step = H200_STEP_S * PAPER_BATCH / 2  # the recorded step scaled to 32 episodes
    data = PAPER_BATCH * paper / WORKERS
    results["data_wait_estimate"] = {
        "episode_seconds_paper_preset": paper,
        "h200_step_seconds_for_32_episodes": round(step, 2),
        "data_seconds_per_step_with_8_workers": round(data, 2),
        "wait_fraction": round(max(0.0, 1.0 - step / data), 3) if data else None,
    }
    Path(output).write_text(json.dumps(results, indent=4) + "\n")
    print(json.dumps(results["data_wait_estimate"], indent=4))


if __name__ == "__main__":
    fire.Fire(main)
