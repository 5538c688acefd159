"""Does the IRIS recipe work on real images? Train it on a labelled dataset, then score it on the validation subjects.

Example (``../shared/data/macaque_brains`` is the development set; any MSD-style ``dataset.json`` with
``held_out_labels`` and a ``validation`` split works)::

    python scripts/real_data_check.py --dataset ../shared/data/macaque_brains/dataset.json --output_dir out/macaque

1. **Training**: ``python -m monai.bundle run training`` with ``train.json`` and a preset (default
   ``bundle/configs/presets/real_small_cpu.json``) on the dataset's training subjects; its ``held_out_labels`` never
   take part (``--with_demo True`` adds the synthetic demo pool). ``--skip_training True`` scores an existing
   ``OUT/models/model.pt``.
2. **In-context segmentation as a user runs it**: ``inference.json`` segments every validation subject for the held-out
   classes, then for the seen classes, with references from training subjects: ``one_shot`` (one reference),
   ``ensemble`` (``ensemble_k`` references), ``tuning`` (the one reference, ``tuning_steps``) and ``wrong_reference``
   (one-shot with every class given another class's mask: near 0 when the model reads its reference).
3. **Controls on the same cases**: the reference mask at the same position (``position_rule``), the reference's
   intensity range (``intensity_rule``), and a MONAI UNet trained on the one reference for ``unet_seconds``
   (``unet_1shot``, at 1.5 mm with 64³ patches; ``--unet_seconds 0`` leaves it out).

Dice is computed per class on the written label map at the data's native resolution, averaged over validation
subjects and reference draws, then over classes. Writes ``OUT/real_data_check.json`` and one picture per case
(``OUT/cases/<subject>_<group>.png``: truth, each strategy and the UNet).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import fire
import numpy as np
import torch
from monai.bundle import run as bundle_run
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    Invertd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from monai.utils import convert_to_tensor
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(BUNDLE))

from scripts.data.image_io import LoadImagesd, quiet_nvimagecodec_notices  # noqa: E402
from scripts.data.pool import DatasetInfo, read_dataset_json  # noqa: E402
from scripts.data.transforms import intensity_normalization  # noqa: E402
from scripts.drawing import annotated, overlay_panels, palette_colour  # noqa: E402
from scripts.segmentation.controls import dice, intensity_rule, position_rule  # noqa: E402
from scripts.segmentation.support import preprocessing  # noqa: E402

logger = logging.getLogger("real_data_check")

STRATEGIES = ("one_shot", "ensemble", "tuning", "wrong_reference")
GROUPS = ("held_out", "seen")
UNET_SPACING = (1.5, 1.5, 1.5)
UNET_PATCH = (64, 64, 64)


def read_label(path: str) -> np.ndarray:
    return np.asarray(LoadImagesd("label")({"label": path})["label"])[0].round().astype(np.int32)


def read_image(path: str) -> np.ndarray:
    return np.asarray(LoadImagesd("image")({"image": path})["image"], dtype=np.float32)[0]


def group_classes(info: DatasetInfo) -> dict[str, dict[str, int]]:
    """Class name -> label value of the held-out and of the seen classes."""
    held = {name: value for value, name in sorted(info.labels.items()) if name in info.held_out}
    seen = {name: value for value, name in sorted(info.labels.items()) if name not in info.held_out}
    return {"held_out": held, "seen": seen}


def subjects(info: DatasetInfo, split: str) -> list[dict[str, str]]:
    return [{key: str(info.root / entry[key]) for key in ("image", "label")} for entry in info.entries[split]]


# ---------------------------------------------------------------------------------------------------------- training


def override_arguments(overrides: Mapping[str, object]) -> list[str]:
    """train.json ids as MONAI command-line arguments: on/off values as ``True``/``False`` (its command line reads
    ``true``/``false`` as text), text as it is, anything else as JSON."""
    arguments = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else str(value) if isinstance(value, bool) else json.dumps(value)
        arguments += [f"--{key}", text]
    return arguments


def train(dataset: Path, output_dir: Path, preset: Path, with_demo: bool, overrides: Mapping[str, object]) -> dict:
    """Train with the bundle's command line; returns the wall time and the run's summary."""
    pool = [str(dataset.resolve())]
    if with_demo:
        from scripts.data.demo_data import ensure_demo_data

        pool.append(ensure_demo_data(BUNDLE / "data" / "demo"))
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", str(BUNDLE),
        "--config_file", json.dumps([str(BUNDLE / "configs" / "train.json"), str(preset)]),
        "--data_pool", json.dumps(pool), "--ckpt_dir", str(output_dir / "models"),
        "--output_dir", str(output_dir / "logs"), "--train#pool#cache_dir", str(output_dir / "cache"),
    ]  # fmt: skip
    command += override_arguments(overrides)
    log = output_dir / "training.log"
    logger.info(f"Training (log: {log}): {' '.join(command)}")
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - start) / 60
    if result.returncode != 0:
        raise RuntimeError(f"Training failed (exit {result.returncode}); see {log}.")
    summary = json.loads((output_dir / "logs" / "training_summary.json").read_text())
    return {"training_minutes": round(minutes, 2), "training_summary": summary, "command": command}


# --------------------------------------------------------------------------------------------- in-context inference


def wrong_reference_label(label_path: str, classes: Mapping[str, int], output: Path) -> str:
    """A copy of a reference label map in which every class's value marks the next class's voxels (cyclically)."""
    import nibabel as nib

    source = nib.load(label_path)
    label = np.asarray(source.dataobj)
    values = list(classes.values())
    shuffled = np.zeros_like(label)
    for value, other in zip(values, values[1:] + values[:1]):
        shuffled[label == other] = value
    output.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(shuffled, source.affine, source.header), str(output))
    return str(output)


def segment(
    model: Path,
    queries: Sequence[str],
    references: Sequence[Mapping[str, str]],
    classes: Mapping[str, int],
    strategy: str,
    output_dir: Path,
    tuning_steps: int,
    modality: str,
    options: Mapping[str, object],
) -> dict[str, str]:
    """Run ``inference.json`` as a user would, naming the queries' modality (needed when the model was trained on
    several, as with ``--with_demo``) and with the ``inference.json`` ``options``; returns query -> written label
    map."""
    bundle_run(
        config_file=str(BUNDLE / "configs" / "inference.json"),
        bundle_root=str(BUNDLE),
        ckpt_path=str(model),
        query_images=list(queries),
        support_images=[reference["image"] for reference in references],
        support_labels=[reference["label"] for reference in references],
        classes=dict(classes),
        strategy=strategy,
        tuning_steps=tuning_steps,
        modality=modality,
        output_dir=str(output_dir),
        save_previews=False,
        **options,
    )
    summary = json.loads((output_dir / "summary.json").read_text())
    return {entry["query"]: entry["segmentation"] for entry in summary["queries"]}


def class_dice(prediction: np.ndarray, truth: np.ndarray, classes: Mapping[str, int]) -> dict[str, float]:
    """Dice of each class (present in the truth) between two label maps with the same values."""
    return {
        name: dice(prediction == value, truth == value) for name, value in classes.items() if (truth == value).any()
    }


# ---------------------------------------------------------------------------------------------------- trivial rules


def rule_dice(
    reference: Mapping[str, str], query: Mapping[str, str], classes: Mapping[str, int], modality: str
) -> dict[str, dict[str, float]]:
    """Dice of the position and intensity rules with ``reference`` on ``query``, at native resolution."""
    normalise = intensity_normalization(modality)
    images = [normalise({"image": torch.as_tensor(read_image(case["image"]))[None]})["image"][0].numpy()
              for case in (reference, query)]  # fmt: skip
    reference_label, truth = read_label(reference["label"]), read_label(query["label"])
    scores: dict[str, dict[str, float]] = {"position_rule": {}, "intensity_rule": {}}
    for name, value in classes.items():
        if not (truth == value).any() or not (reference_label == value).any():
            continue
        mask = reference_label == value
        scores["position_rule"][name] = dice(position_rule(mask, truth.shape), truth == value)
        scores["intensity_rule"][name] = dice(intensity_rule(images[0], mask, images[1]), truth == value)
    return scores


# ------------------------------------------------------------------------------------------------ the UNet baseline


def unet_one_shot(
    reference: Mapping[str, str],
    queries: Sequence[Mapping[str, str]],
    classes: Mapping[str, int],
    modality: str,
    seconds: float,
    output_dir: Path,
    seed: int = 0,
) -> dict[str, str]:
    """Train a MONAI UNet on the one reference for ``seconds`` (1.5 mm, 64³ patches, Dice + CE), then segment the
    queries; returns query image -> label map written at native resolution (values of ``classes``). The result is
    kept in ``output_dir`` and reused by a later check with the same reference, classes, time and seed."""
    key = json.dumps(
        {
            "reference": reference,
            "queries": [q["image"] for q in queries],
            "classes": classes,
            "seconds": float(seconds),  # 300 and 300.0: the same run
            "seed": seed,
            "spacing": UNET_SPACING,
            "patch": UNET_PATCH,
        },
        sort_keys=True,
    )
    record = output_dir / "unet.json"
    if record.is_file() and json.loads(record.read_text())["key"] == key:
        return json.loads(record.read_text())["written"]
    torch.manual_seed(seed)
    values = list(classes.values())
    load = preprocessing(modality, UNET_SPACING, keys=("image", "label"))
    data = load(dict(reference))
    label = torch.zeros_like(data["label"])
    for index, value in enumerate(values, start=1):
        label[data["label"] == value] = index
    sample = {"image": torch.as_tensor(data["image"]).float(), "label": torch.as_tensor(label)}
    augment = Compose(
        [
            SpatialPadd(("image", "label"), UNET_PATCH),
            RandCropByPosNegLabeld(("image", "label"), "label", UNET_PATCH, pos=2, neg=1, num_samples=2),
            RandAffined(("image", "label"), prob=0.5, rotate_range=(0.17,) * 3, scale_range=(0.1,) * 3,
                        mode=("bilinear", "nearest"), padding_mode="zeros"),
            *[RandFlipd(("image", "label"), prob=0.5, spatial_axis=axis) for axis in range(3)],
            RandScaleIntensityd("image", factors=0.15, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    )  # fmt: skip
    augment.set_random_state(seed)
    network = UNet(3, 1, len(values) + 1, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="instance")
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-5)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    network.train()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        patches = augment(sample)
        images = convert_to_tensor(torch.stack([patch["image"] for patch in patches]), track_meta=False)
        labels = convert_to_tensor(torch.stack([patch["label"] for patch in patches]), track_meta=False)
        optimizer.zero_grad()
        loss = loss_function(network(images), labels)
        loss.backward()
        optimizer.step()
        steps += 1
    logger.info(f"UNet: {steps} steps in {seconds:.0f} s, last loss {loss.item():.4f}")
    network.eval()
    lookup = torch.tensor([0, *values], dtype=torch.int16)
    written = {}
    query_load = preprocessing(modality, UNET_SPACING, keys=("image",), track_meta=True)
    for query in queries:
        item = query_load({"image": query["image"]})
        with torch.no_grad():
            logits = sliding_window_inference(item["image"][None].as_tensor(), UNET_PATCH, 2, network, overlap=0.5)
        labels = lookup[logits[0].argmax(0, keepdim=True)]
        item["pred"] = MetaTensor(labels, meta=item["image"].meta, applied_operations=item["image"].applied_operations)
        native = Invertd("pred", query_load, orig_keys="image", nearest_interp=True)(item)["pred"]
        path = output_dir / f"{Path(query['image']).name.split('.')[0]}_unet.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(native)[0].round().astype(np.int16))
        written[query["image"]] = str(path)
    record.write_text(json.dumps({"key": key, "written": written, "steps": steps}))
    return written


# ---------------------------------------------------------------------------------------------------------- the check


def read_prediction(path: str) -> np.ndarray:
    return np.load(path) if path.endswith(".npy") else read_label(path)


def case_picture(
    query: Mapping[str, str], predictions: Mapping[str, str], classes: Mapping[str, int], path: Path
) -> None:
    """Orthogonal slices through the classes' centre: truth, then each method's label map, one row each."""
    image, truth = read_image(query["image"]), read_label(query["label"])
    values = list(classes.values())
    truth = np.where(np.isin(truth, values), truth, 0)
    centre = np.argwhere(truth > 0).mean(0).astype(int)
    rows = [("truth", truth)] + [(name, read_prediction(file)) for name, file in predictions.items()]
    panels = [overlay_panels(image, labels, values, centre) for _, labels in rows]
    legend = [(f"rows: {', '.join(name for name, _ in rows)}", (255, 255, 255))]
    legend += [(name, palette_colour(index)) for index, name in enumerate(classes)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(annotated(np.concatenate(panels, axis=0), legend)).save(path)


def mean_over(scores: Mapping[str, list[float]]) -> float | None:
    """Mean over classes of each class's mean over cases."""
    means = [float(np.mean(values)) for values in scores.values() if values]
    return round(float(np.mean(means)), 4) if means else None


def check(
    dataset: str,
    output_dir: str,
    preset: str = str(BUNDLE / "configs" / "presets" / "real_small_cpu.json"),
    with_demo: bool = False,
    skip_training: bool = False,
    draws: int = 2,
    ensemble_k: int = 3,
    tuning_steps: int = 20,
    unet_seconds: float = 300.0,
    unet_dir: str | None = None,
    groups: Sequence[str] = GROUPS,
    keep_largest_component: bool = False,
    threshold_from_reference_volume: bool = False,
    lowest_threshold: float = 0.05,
    **overrides,
) -> dict:
    """Train (unless ``skip_training``) and score; see the module docstring. ``overrides`` are train.json ids;
    ``unet_dir`` keeps the UNet's results for later checks of the same dataset (the UNet does not depend on IRIS);
    ``keep_largest_component``, ``threshold_from_reference_volume`` and ``lowest_threshold`` are inference.json's."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    dataset_path, out = Path(dataset).resolve(), Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info = read_dataset_json(dataset_path)
    training, validation = subjects(info, "training"), subjects(info, "validation")
    if not info.held_out or not validation or len(training) < ensemble_k:
        raise ValueError(
            f"{dataset_path} needs held_out_labels, a validation split and at least {ensemble_k} training subjects."
        )
    options = {"keep_largest_component": keep_largest_component,
               "threshold_from_reference_volume": threshold_from_reference_volume,
               "lowest_threshold": lowest_threshold}  # fmt: skip
    report: dict = {"dataset": str(dataset_path), "preset": str(preset), "with_demo": with_demo, "overrides": overrides,
                    **options}  # fmt: skip
    model = out / "models" / "model.pt"
    if not skip_training:
        report.update(train(dataset_path, out, Path(preset).resolve(), with_demo, overrides))
    elif (out / "logs" / "training_summary.json").is_file():
        report["training_summary"] = json.loads((out / "logs" / "training_summary.json").read_text())
    report["model"] = str(model)
    classes_by_group = group_classes(info)
    for group in groups:
        classes = classes_by_group[group]
        scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for draw in range(draws):
            chosen = [training[(draw + i) % len(training)] for i in range(ensemble_k)]
            work = out / "work" / group / f"draw{draw}"
            queries = [case["image"] for case in validation]
            written: dict[str, dict[str, str]] = {}
            wrong = {"image": chosen[0]["image"], "label": wrong_reference_label(
                chosen[0]["label"], classes, work / "wrong_reference_label.nii.gz")}  # fmt: skip
            runs = {"one_shot": [chosen[0]], "ensemble": chosen, "tuning": [chosen[0]], "wrong_reference": [wrong]}
            for strategy, references in runs.items():
                name = "one_shot" if strategy == "wrong_reference" else strategy
                start = time.perf_counter()
                written[strategy] = segment(
                    model, queries, references, classes, name, work / strategy, tuning_steps, info.modality, options
                )
                logger.info(f"{group}, draw {draw}, {strategy}: {time.perf_counter() - start:.1f} s")
            if unet_seconds > 0:
                unet_work = Path(unet_dir).resolve() / group / f"draw{draw}" if unet_dir else work
                written["unet_1shot"] = unet_one_shot(
                    chosen[0], validation, classes, info.modality, unet_seconds, unet_work
                )
            for case in validation:
                truth = read_label(case["label"])
                for method, files in written.items():
                    for name, value in class_dice(read_prediction(files[case["image"]]), truth, classes).items():
                        scores[method][name].append(value)
                for rule, by_class in rule_dice(chosen[0], case, classes, info.modality).items():
                    for name, value in by_class.items():
                        scores[rule][name].append(value)
                if draw == 0:
                    picture = out / "cases" / f"{Path(case['image']).name.split('.')[0]}_{group}.png"
                    case_picture(case, {m: files[case["image"]] for m, files in written.items()}, classes, picture)
        report[group] = {method: mean_over(by_class) for method, by_class in scores.items()}
        report[group]["per_class"] = {
            method: {name: round(float(np.mean(values)), 4) for name, values in by_class.items()}
            for method, by_class in scores.items()
        }
        logger.info(f"{group}: " + ", ".join(f"{m} {v}" for m, v in report[group].items() if m != "per_class"))
        (out / "real_data_check.json").write_text(json.dumps(report, indent=4))
    return {group: {k: v for k, v in report[group].items() if k != "per_class"} for group in groups}


if __name__ == "__main__":
    quiet_nvimagecodec_notices()
    fire.Fire(check)
