"""A pool of MSD-style datasets: read each ``dataset.json``, check every subject, cache the preprocessed volumes.

Every problem in the pool is collected and reported in one error before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data.utils import affine_to_spacing
from monai.utils import convert_to_tensor

from ..atomic import atomic_save
from ..errors import IrisInputError
from .image_io import LoadImagesd
from .transforms import normalisation, subject_preprocessing, target_spacing_or_native

logger = logging.getLogger(__name__)

FOREGROUND_SAMPLES = 512  # voxel coordinates kept per class to centre foreground-aware crops
SPLITS = ("training", "validation", "test")  # "test": labelled subjects kept out of model selection
CACHE_FORMAT = 3  # bumped when a cache entry's content changes, so older entries are rebuilt


class DatasetPoolError(IrisInputError):
    """Raised with every invalid entry of the pool listed, so a user can fix them all at once."""


@dataclass
class DatasetInfo:
    """One dataset of the pool, as declared by its ``dataset.json``."""

    name: str
    root: Path
    modality: str
    labels: dict[int, str]
    held_out: set[str]
    entries: dict[str, list] = field(default_factory=dict)  # split name -> datalist entries

    def class_name(self, value: int) -> str:
        """Global class name ``dataset/label``."""
        return f"{self.name}/{self.labels[value]}"


@dataclass
class Subject:
    """A preprocessed, validated subject: image C x D x H x W, label 1 x D x H x W, and where each class lies.

    A 2D image is a single-slice volume (``W == 1``, see :class:`scripts.data.transforms.AddSliceAxisd`).

    The volumes are held in memory (``tensors``) or, with the disk cache, read from ``cache_file`` when used.
    """

    dataset: int
    image_path: str
    foreground: dict[int, np.ndarray] = field(default_factory=dict)  # label value -> N x 3 voxel coordinates
    voxels: dict[int, int] = field(default_factory=dict)  # label value -> its voxel count
    shape: tuple[int, ...] = ()  # spatial shape D x H x W after preprocessing
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)  # voxel size in mm after preprocessing, for surface metrics
    tensors: tuple[torch.Tensor, torch.Tensor] | None = None
    cache_file: str | None = None

    def volumes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (float32, C x D x H x W) and label (int16, 1 x D x H x W) volumes."""
        if self.tensors is not None:
            return self.tensors
        content = torch.load(self.cache_file, map_location="cpu", weights_only=True, mmap=True)  # reads a crop only
        return content["image"], content["label"]

    @property
    def image(self) -> torch.Tensor:
        return self.volumes()[0]

    @property
    def label(self) -> torch.Tensor:
        return self.volumes()[1]

    @property
    def classes(self) -> set[int]:
        return set(self.foreground)

    @property
    def is_single_slice(self) -> bool:
        """A 2D image, held as a single-slice volume."""
        return self.shape[-1] == 1


def check_subject(record: Mapping[str, str], data: Mapping[str, torch.Tensor], labels: Collection[int]) -> str | None:
    """Why a loaded image/label pair (channel first) is unusable, or None: dimensions, shape, geometry, values.

    Args:
        record: ``image`` and ``label`` paths, named in the problem.
        data: the loaded ``image`` and ``label``.
        labels: the label values declared by the dataset (0, background, is always allowed).
    """
    image, label = data["image"], data["label"]
    if image.dim() not in (3, 4):
        return f"{record['image']}: has {image.dim() - 1} spatial dimensions, a 2D image or 3D volume is expected"
    if label.shape[0] != 1:
        return f"{record['label']}: has {label.shape[0]} channels, a label map has one"
    if image.shape[1:] != label.shape[1:]:
        return f"{record['label']}: shape {tuple(label.shape[1:])} differs from image shape {tuple(image.shape[1:])}"
    if not np.allclose(np.asarray(image.affine), np.asarray(label.affine), atol=1e-3):
        return f"{record['label']}: affine differs from the image's affine"
    if not torch.isfinite(torch.as_tensor(image)).all():
        return f"{record['image']}: contains NaN or Inf voxels"
    values = {int(v) for v in torch.unique(torch.as_tensor(label)).tolist()}
    unknown = values - set(labels) - {0}
    if unknown:
        return f"{record['label']}: label values {sorted(unknown)} are not in 'labels' (known: {sorted(labels)})"
    return None


def read_dataset_json(path: Path) -> DatasetInfo:
    """The dataset described by an MSD-style ``dataset.json``, checked (its subjects are not read)."""
    if not path.is_file():
        raise DatasetPoolError(f"Dataset description {path} does not exist; prepare the dataset first.")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetPoolError(f"{path} is not valid JSON: {error}") from error
    for key in ("labels", "training"):
        if key not in content:
            raise DatasetPoolError(f"{path} has no '{key}' entry (MSD dataset.json format expected).")
    modality = content.get("modality", "CT")
    if isinstance(modality, dict):
        modality = modality.get("0", next(iter(modality.values()), "CT"))
    labels = {int(value): str(name) for value, name in content["labels"].items() if int(value) != 0}
    held_out = set(content.get("held_out_labels", []))
    unknown = held_out - set(labels.values())
    if unknown:
        raise DatasetPoolError(f"{path}: held_out_labels {sorted(unknown)} are not names in 'labels'.")
    entries = {split: content.get(split, []) for split in SPLITS}
    return DatasetInfo(content.get("name", path.parent.name), path.parent, str(modality), labels, held_out, entries)


class DatasetPool:
    """Datasets of the pool and their validated, preprocessed subjects for one split.

    Args:
        dataset_files: paths of MSD-style ``dataset.json`` files.
        split: ``"training"``, ``"validation"`` or ``"test"`` (labelled entries, like the other two).
        target_spacing: resampling spacing in mm, or None (``"native"``) to keep native spacing.
        min_class_voxels: a class smaller than this in a subject does not count as present there.
        num_workers: threads used to load and preprocess subjects.
        skip_invalid: drop invalid subjects with a warning instead of raising.
        cache: ``"memory"`` keeps every preprocessed volume in RAM (about 6 bytes per voxel); ``"disk"`` writes
            them once to ``cache_dir`` and reads them when an episode needs them, for pools larger than RAM. A disk
            cache is reused by later runs (keyed by file, size, modification time and preprocessing).
        cache_dir: folder of the disk cache.
        in_channels: the network's image channels; RGB images are converted to match.
        coordinate_channels: append each voxel's place in the volume as channels after the image's (see
            :class:`scripts.data.transforms.AppendCoordinatesd`); ``in_channels`` still counts the image's only.
    """

    def __init__(
        self,
        dataset_files: Sequence[str],
        split: str = "training",
        target_spacing: Sequence[float] | None = None,
        min_class_voxels: int = 10,
        num_workers: int = 2,
        skip_invalid: bool = False,
        cache: str = "memory",
        cache_dir: str | None = None,
        in_channels: int = 1,
        coordinate_channels: bool = False,
    ) -> None:
        if cache not in ("memory", "disk"):
            raise ValueError(f"train#pool#cache must be 'memory' or 'disk', got '{cache}'.")
        if cache == "disk" and not cache_dir:
            raise ValueError("train#pool#cache 'disk' needs train#pool#cache_dir.")
        self.cache_dir = Path(cache_dir) if cache == "disk" else None
        self.target_spacing = target_spacing_or_native(target_spacing)
        if isinstance(dataset_files, (str, Path)):
            dataset_files = [dataset_files]
        self._settings = {"dataset_files": list(dataset_files), "target_spacing": target_spacing,
                          "min_class_voxels": min_class_voxels, "num_workers": num_workers,
                          "skip_invalid": skip_invalid, "cache": cache, "cache_dir": cache_dir,
                          "in_channels": in_channels, "coordinate_channels": coordinate_channels}  # fmt: skip
        if not dataset_files:
            raise DatasetPoolError("data_pool is empty: give at least one dataset.json path.")
        self.datasets = [read_dataset_json(Path(path)) for path in dataset_files]
        names = [info.name for info in self.datasets]
        if len(set(names)) != len(names):
            raise DatasetPoolError(f"Dataset names in the pool must be unique, got {names}.")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
        self.split = split
        self.min_class_voxels = min_class_voxels
        self._preprocess = [
            subject_preprocessing(
                info.modality,
                target_spacing,
                track_meta=True,
                in_channels=in_channels,
                coordinate_channels=coordinate_channels,
            )
            for info in self.datasets
        ]
        self.in_channels = in_channels
        self.coordinate_channels = coordinate_channels
        self._load = LoadImagesd(keys=("image", "label"))
        self.subjects = self._load_all(num_workers, skip_invalid)
        self._holders: dict[tuple[str, int], list[Subject]] | None = None

    def with_split(self, split: str) -> DatasetPool:
        """The pool of another split of the same datasets, with the same settings (validation next to training)."""
        return DatasetPool(**{**self._settings, "split": split})

    @property
    def class_names(self) -> list[str]:
        """Global names of every labelled class of every dataset, in a fixed order."""
        return [info.class_name(value) for info in self.datasets for value in sorted(info.labels)]

    @property
    def held_out_class_names(self) -> list[str]:
        """Global names of the classes kept out of training episodes."""
        return [
            info.class_name(v) for info in self.datasets for v in sorted(info.labels) if info.labels[v] in info.held_out
        ]

    def holders(self, dataset_name: str, value: int) -> list[Subject]:
        """Subjects of dataset ``dataset_name`` in which class ``value`` is present (looked up, not rescanned)."""
        if self._holders is None:
            self._holders = {}
            for subject in self.subjects:
                for present in subject.classes:
                    key = (self.datasets[subject.dataset].name, present)
                    self._holders.setdefault(key, []).append(subject)
        return self._holders.get((dataset_name, value), [])

    def is_held_out(self, dataset: int, value: int) -> bool:
        info = self.datasets[dataset]
        return info.labels[value] in info.held_out

    def _records(self) -> list[tuple[int, dict[str, str], int]]:
        """Per entry of the split: its dataset, its files, and the seed of its foreground sample.

        The seed comes from the dataset name and the image path as ``dataset.json`` writes it, not from where the data
        lies on disk, so a copy of the data in another folder gives the same episodes.
        """
        records = []
        for index, info in enumerate(self.datasets):
            for entry in info.entries.get(self.split, []):
                if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                    raise DatasetPoolError(
                        f"{info.root / 'dataset.json'}: every '{self.split}' entry needs 'image' and 'label', "
                        f"got {entry}."
                    )
                files = {key: str(info.root / entry[key]) for key in ("image", "label")}
                records.append((index, files, zlib.crc32(f"{info.name}/{entry['image']}".encode())))
        return records

    def _load_all(self, num_workers: int, skip_invalid: bool) -> list[Subject]:
        records = self._records()
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as executor:
            results = list(executor.map(lambda record: self._load_subject(*record), records))
        problems = [result for result in results if isinstance(result, str)]
        if problems and not skip_invalid:
            listing = "\n".join(f"  - {problem}" for problem in problems)
            raise DatasetPoolError(f"{len(problems)} invalid '{self.split}' entries in the data pool:\n{listing}")
        for problem in problems:
            logger.warning(f"Skipping invalid subject: {problem}")
        subjects = [result for result in results if isinstance(result, Subject)]
        unusable = [subject.image_path for subject in subjects if not subject.foreground]
        for path in unusable:
            logger.warning(f"Skipping {path}: no labelled class with at least {self.min_class_voxels} voxels.")
        return [subject for subject in subjects if subject.foreground]

    def _cache_file(self, dataset: int, record: dict[str, str], seed: int) -> Path | None:
        if self.cache_dir is None:
            return None
        stats = [
            (record[key], Path(record[key]).stat().st_size, Path(record[key]).stat().st_mtime_ns) for key in record
        ]
        preprocessing = (
            normalisation(self.datasets[dataset].modality),
            self.target_spacing,
            self.min_class_voxels,
            self.in_channels,
            self.coordinate_channels,
            CACHE_FORMAT,
        )
        key = repr((stats, seed, *preprocessing))
        return self.cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"

    def _load_subject(self, dataset: int, record: dict[str, str], seed: int) -> Subject | str:
        """Load, check and preprocess one subject; return a problem description instead of raising."""
        missing = [record[key] for key in ("image", "label") if not Path(record[key]).exists()]  # DICOM: a folder
        if missing:
            return f"{', '.join(missing)}: file not found"
        cache_file = self._cache_file(dataset, record, seed)
        if cache_file is not None and cache_file.is_file():
            try:
                content = torch.load(cache_file, map_location="cpu", weights_only=True)
                return Subject(
                    dataset,
                    record["image"],
                    foreground={int(v): c.numpy() for v, c in content["foreground"].items()},
                    voxels={int(v): int(n) for v, n in content["voxels"].items()},
                    shape=tuple(content["shape"]),
                    spacing=tuple(content["spacing"]),
                    cache_file=str(cache_file),
                )
            except Exception as error:  # an unreadable cache entry is rebuilt from the original files
                logger.warning(f"Rebuilding the cache entry {cache_file} of {record['image']}: {error}")
        try:
            data = self._load(record)
        except Exception as error:  # any reader failure means the file is unusable; say which and why
            return f"{record['image']} / {record['label']}: cannot be read ({type(error).__name__}: {error})"
        problem = check_subject(record, data, self.datasets[dataset].labels)
        if problem:
            return problem
        try:
            data = self._preprocess[dataset](data)
        except Exception as error:  # e.g. image channels the network cannot take; MONAI wraps the cause
            while error.__cause__ is not None:
                error = error.__cause__
            return f"{record['image']}: cannot be preprocessed ({error})"
        spacing = tuple(float(x) for x in affine_to_spacing(data["image"].affine, r=3))
        image = convert_to_tensor(data["image"], dtype=torch.float32, track_meta=False)
        label = convert_to_tensor(data["label"], track_meta=False).round().to(torch.int16)
        foreground, voxels = self._foreground(label, seed=seed)
        shape = tuple(label.shape[1:])
        if cache_file is None:
            return Subject(dataset, record["image"], foreground, voxels, shape, spacing, (image, label))
        content = {
            "image": image,
            "label": label,
            "foreground": {value: torch.from_numpy(coords) for value, coords in foreground.items()},
            "voxels": voxels,
            "shape": list(shape),
            "spacing": list(spacing),
        }
        atomic_save(content, cache_file)
        return Subject(dataset, record["image"], foreground, voxels, shape, spacing, None, str(cache_file))

    def _foreground(self, label: torch.Tensor, seed: int) -> tuple[dict[int, np.ndarray], dict[int, int]]:
        """Per class present with at least ``min_class_voxels`` voxels: a fixed random sample of its voxel coordinates,
        and its voxel count."""
        rng = np.random.default_rng(seed)
        array = label[0].numpy()
        foreground, voxels = {}, {}
        for value in np.unique(array):
            if value == 0:
                continue
            coords = np.argwhere(array == value)
            if len(coords) >= self.min_class_voxels:
                keep = rng.choice(len(coords), size=min(len(coords), FOREGROUND_SAMPLES), replace=False)
                foreground[int(value)] = coords[np.sort(keep)]
                voxels[int(value)] = len(coords)
        return foreground, voxels

    def mean_class_voxels(self) -> dict[str, float]:
        """Mean voxel count of each class over the subjects that hold it, by global class name."""
        counts: dict[str, list[int]] = {}
        for subject in self.subjects:
            info = self.datasets[subject.dataset]
            for value, count in subject.voxels.items():
                counts.setdefault(info.class_name(value), []).append(count)
        return {name: float(np.mean(values)) for name, values in counts.items()}
