"""Turn a downloaded dataset into a training pool entry: check every file, then write ``OUT/dataset.json``.

Example::

    python scripts/prepare_datasets.py --source Task03_Liver --format msd --output_dir data/liver
    python scripts/prepare_datasets.py --source Dataset027_ACDC --format nnunet --output_dir data/acdc
    python scripts/prepare_datasets.py --source covid --format folder --output_dir data/covid --modality CT \\
        --labels "{1: 'lesion'}"
    python scripts/prepare_datasets.py --source isic --format folder2d --output_dir data/isic --modality dermoscopy \\
        --labels "{255: 'lesion'}" --label_suffix _segmentation

Layouts (``--format``):

- ``msd``: ``dataset.json`` (``name``, ``modality``, ``labels`` value -> name, ``training`` image/label pairs).
- ``nnunet``: nnU-Net v2 raw: ``dataset.json`` (``channel_names``, ``labels`` name -> value, ``file_ending``),
  ``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``.
- ``folder``: ``images/`` and ``labels/`` paired by name; images NIfTI, NRRD, MHA or a DICOM series folder.
- ``folder2d``: the same with 2D PNG/JPEG/TIFF images and PNG/GIF/TIFF/BMP masks.

Every image/label pair is read and checked (readable, same shape and geometry, label values in the map); all problems
are reported together and no ``dataset.json`` is written. The written ``dataset.json`` is the bundle's pool format:
``name``, ``modality``, ``labels`` (value -> name), ``training`` and ``validation`` (split with ``--seed``),
``held_out_labels``, with paths relative to ``OUT``, so ``data_pool`` can list it directly.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fire
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.atomic import atomic_write_text  # noqa: E402
from scripts.data.image_io import PLANAR_SUFFIXES, LoadImagesd, is_planar, quiet_nvimagecodec_notices  # noqa: E402
from scripts.data.pool import check_subject  # noqa: E402

FORMATS = ("msd", "nnunet", "folder", "folder2d")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class PreparationError(ValueError):
    """Raised with every problem of a source dataset listed, before anything is written."""


def _stem(path: Path) -> str:
    """File name without its image suffix (``.nii.gz`` counts as one); a DICOM series folder keeps its name."""
    name = path.name
    for suffix in (*VOLUME_SUFFIXES, *PLANAR_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PreparationError(f"{path} does not exist: is --source the dataset's root folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PreparationError(f"{path} is not valid JSON: {error}") from error


def _msd(source: Path) -> tuple[str, str, dict[int, str], list[tuple[Path, Path]]]:
    content = _read_json(source / "dataset.json")
    missing = [key for key in ("modality", "labels", "training") if key not in content]
    if missing:
        raise PreparationError(f"{source / 'dataset.json'} lacks {missing} (MSD format expected).")
    modality = content["modality"]
    modality = modality.get("0", "") if isinstance(modality, Mapping) else str(modality)
    labels = {int(value): str(name) for value, name in content["labels"].items()}
    pairs = [(source / entry["image"], source / entry["label"]) for entry in content["training"]]
    return content.get("name", source.name), modality, labels, pairs


def _nnunet(source: Path, channel: int) -> tuple[str, str, dict[int, str], list[tuple[Path, Path]]]:
    content = _read_json(source / "dataset.json")
    missing = [key for key in ("channel_names", "labels", "file_ending") if key not in content]
    if missing:
        raise PreparationError(f"{source / 'dataset.json'} lacks {missing} (nnU-Net v2 format expected).")
    if str(channel) not in content["channel_names"]:
        raise PreparationError(f"--channel {channel} is not in channel_names {content['channel_names']}.")
    regions = [name for name, value in content["labels"].items() if not isinstance(value, int)]
    if regions:
        raise PreparationError(f"{source / 'dataset.json'}: region labels {regions} are not supported; use integers.")
    labels = {int(value): str(name) for name, value in content["labels"].items()}
    ending = content["file_ending"]
    labels_dir = source / "labelsTr"
    pairs = [
        (source / "imagesTr" / f"{_stem(p)}_{channel:04d}{ending}", p) for p in sorted(labels_dir.glob(f"*{ending}"))
    ]
    if not pairs:
        raise PreparationError(f"No label files '*{ending}' in {labels_dir}.")
    name = source.name.split("_", 1)[-1] if source.name.startswith("Dataset") else source.name
    return name, str(content["channel_names"][str(channel)]), labels, pairs


def _folder(source: Path, planar: bool, image_suffix: str, label_suffix: str) -> tuple[list[tuple[Path, Path]], list]:
    """Pair ``images/<case><image_suffix>.*`` with ``labels/<case><label_suffix>.*``; unpaired files are problems."""
    problems = []
    found = {}
    for kind, suffix in (("images", image_suffix), ("labels", label_suffix)):
        folder = source / kind
        if not folder.is_dir():
            raise PreparationError(f"{folder} does not exist: --format folder/folder2d expect images/ and labels/.")
        files = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if planar != is_planar(path) or (planar and path.is_dir()):
                expected = (
                    "2D PNG/JPEG/TIFF/GIF/BMP files" if planar else "NIfTI/NRRD/MHA files or DICOM series folders"
                )
                problems.append(
                    f"{path}: not one of the {expected} expected by --format {'folder2d' if planar else 'folder'}"
                )
                continue
            stem = _stem(path)
            files[stem[: len(stem) - len(suffix)] if suffix and stem.endswith(suffix) else stem] = path
        found[kind] = files
    images, labels = found["images"], found["labels"]
    problems += [
        f"{images[case]}: no label file for case '{case}' in {source / 'labels'}"
        for case in images.keys() - labels.keys()
    ]
    problems += [
        f"{labels[case]}: no image for case '{case}' in {source / 'images'}" for case in labels.keys() - images.keys()
    ]
    return [(images[case], labels[case]) for case in sorted(images.keys() & labels.keys())], sorted(problems)


def _binarised_masks(pairs: list[tuple[Path, Path]], threshold: int, output_dir: Path) -> list[tuple[Path, Path]]:
    """Write each mask as a PNG label map (1 where its grey value is >= ``threshold``), e.g. for JPEG masks."""
    (output_dir / "labels").mkdir(parents=True, exist_ok=True)
    binarised = []
    for image, label in pairs:
        target = output_dir / "labels" / f"{_stem(label)}.png"
        mask = np.asarray(Image.open(label).convert("L")) >= threshold
        Image.fromarray(mask.astype(np.uint8)).save(target)
        binarised.append((image, target))
    return binarised


def _check_pairs(pairs: Sequence[tuple[Path, Path]], labels: Mapping[int, str], num_workers: int) -> list[str]:
    """Every problem of every pair: missing or unreadable files, then :func:`scripts.data.pool.check_subject`."""
    load = LoadImagesd(keys=("image", "label"))

    def check(pair: tuple[Path, Path]) -> str | None:
        record = {"image": str(pair[0]), "label": str(pair[1])}
        missing = [path for path in record.values() if not Path(path).exists()]
        if missing:
            return f"{', '.join(missing)}: file not found"
        try:
            data = load(record)
        except Exception as error:  # any reader failure means the file is unusable; say which and why
            return f"{record['image']} / {record['label']}: cannot be read ({type(error).__name__}: {error})"
        return check_subject(record, data, labels)

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as executor:
        return [problem for problem in executor.map(check, pairs) if problem]


def _split(pairs: Sequence[tuple[Path, Path]], fraction: float, seed: int) -> tuple[list, list]:
    """Training and validation pairs: a fixed-seed permutation, at least one of each when there are two or more."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    count = min(max(int(round(fraction * len(pairs))), 1 if fraction > 0 else 0), len(pairs) - 1)
    validation = sorted(order[:count].tolist())
    return [pairs[i] for i in range(len(pairs)) if i not in validation], [pairs[i] for i in validation]


def prepare(
    source: str,
    format: str,
    output_dir: str,
    name: str | None = None,
    modality: str | None = None,
    labels: Mapping[int, str] | None = None,
    held_out_labels: Sequence[str] = (),
    validation_fraction: float = 0.2,
    seed: int = 0,
    channel: int = 0,
    image_suffix: str = "",
    label_suffix: str = "",
    mask_threshold: int | None = None,
    num_workers: int = 2,
) -> Path:
    """Check every file of ``source`` (laid out as ``format``) and write ``output_dir/dataset.json``; return its path.

    Args:
        source: the downloaded dataset's root folder.
        format: ``msd``, ``nnunet``, ``folder`` or ``folder2d``.
        output_dir: where ``dataset.json`` is written (paths in it are relative to this folder).
        name: dataset name, the prefix of its global class names ``name/label``; default from the source.
        modality: ``CT``, ``MR``, ``PET``, ... (picks the intensity normalisation); required for folder formats,
            overrides the source's for the others.
        labels: label value -> class name; required for folder formats, overrides the source's for the others.
        held_out_labels: class names kept out of training episodes and reported apart in validation.
        validation_fraction: share of the cases in the validation split.
        seed: seed of the training/validation split.
        channel: nnU-Net input channel (``_0000`` is 0) used as the image.
        image_suffix, label_suffix: removed from file names before pairing (``folder``/``folder2d``), e.g.
            ``_segmentation`` for ISIC masks.
        mask_threshold: ``folder2d`` only: binarise masks at this grey value into PNG label maps written under
            ``output_dir/labels`` (JPEG masks such as Kvasir's are not exactly 0/255).
        num_workers: threads reading and checking files.

    Raises:
        PreparationError: listing every problem found, before anything is written.
    """
    root, out = Path(source).resolve(), Path(output_dir).resolve()
    if format not in FORMATS:
        raise PreparationError(f"--format must be one of {list(FORMATS)}, got '{format}'.")
    if not root.is_dir():
        raise PreparationError(f"--source {source} is not a folder.")
    if format in ("folder", "folder2d") and (not labels or not modality):
        raise PreparationError(f"--format {format} needs --modality and --labels (label value -> name).")
    if mask_threshold is not None and format != "folder2d":
        raise PreparationError("--mask_threshold applies to --format folder2d only.")
    problems: list[str] = []
    if format == "msd":
        default_name, default_modality, default_labels, pairs = _msd(root)
    elif format == "nnunet":
        default_name, default_modality, default_labels, pairs = _nnunet(root, channel)
    else:
        default_name, default_modality, default_labels = root.name, "", {}
        pairs, problems = _folder(root, format == "folder2d", image_suffix, label_suffix)
    label_map = {int(value): str(label) for value, label in (labels or default_labels).items() if int(value) != 0}
    unknown = set(held_out_labels) - set(label_map.values())
    if unknown:
        problems.append(
            f"--held_out_labels {sorted(unknown)} are not class names (known: {sorted(label_map.values())})"
        )
    if mask_threshold is not None:
        pairs = _binarised_masks(pairs, mask_threshold, out)
    problems += _check_pairs(pairs, label_map, num_workers)
    if len(pairs) < 2:
        problems.append(f"{root}: found {len(pairs)} image/label pairs, episodes need at least two subjects")
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        summary = f"{len(problems)} problems in {root} (--format {format}), dataset.json not written"
        raise PreparationError(f"{summary}:\n{listing}")
    training, validation = _split(pairs, validation_fraction, seed)

    def entries(split: Sequence[tuple[Path, Path]]) -> list[dict[str, str]]:
        return [{"image": os.path.relpath(i, out), "label": os.path.relpath(lab, out)} for i, lab in split]

    content = {
        "name": name or default_name,
        "description": f"Prepared from {root} ({format}) by scripts/prepare_datasets.py",
        "modality": {"0": modality or default_modality},
        "labels": {"0": "background", **{str(value): label for value, label in sorted(label_map.items())}},
        "held_out_labels": list(held_out_labels),
        "numTraining": len(training),
        "numValidation": len(validation),
        "training": entries(training),
        "validation": entries(validation),
    }
    path = out / "dataset.json"
    atomic_write_text(json.dumps(content, indent=4) + "\n", path)
    print(f"Wrote {path}: {len(training)} training and {len(validation)} validation cases, classes {label_map}.")
    return path


if __name__ == "__main__":
    quiet_nvimagecodec_notices()
    try:
        fire.Fire(prepare, serialize=str)
    except PreparationError as error:
        sys.exit(f"prepare_datasets: {error}")
