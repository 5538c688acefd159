"""Labels by name: the app's one name -> value map, the names each saved label gives its values, and label checks.

3D Slicer exports the segments of every volume as values 1..N in the order of its segment list, so the same value
means different structures in different volumes. Every label therefore keeps its own name -> value map (from
``label_info`` as Slicer sends it, ``label_names``, the segment metadata of a ``.seg.nrrd``, or the app's
``--conf labels``); classes are matched by name across volumes; and the app answers in one stable name -> value map
(:class:`LabelRegistry`), whose values are 1..N without gaps because Slicer's plugin names the segments of a result
by the rank of their values.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

REGISTRY_FILE = Path(".iris") / "label_values.json"  # in the datastore folder: the map belongs to the annotations


class LabelError(ValueError):
    """A label or image that the app refuses; the message names the volume, the value or the problem."""


class LabelRegistry:
    """The app's name -> value map: values 1..N in the order names first appeared, kept in the datastore folder.

    New names get the next value; no name ever changes value, so label maps, ``/train`` datasets and the segments
    Slicer shows keep their meaning across requests and restarts.

    Args:
        path: the JSON file of the map.
        initial: names to hold values first (``--conf labels``); their values must be 1..N without gaps, as the
            Slicer plugin names result segments by rank.
    """

    def __init__(self, path: Path, initial: Mapping[str, int] | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        stored = json.loads(self.path.read_text()) if self.path.is_file() else {}
        initial = {str(name): int(value) for name, value in (initial or {}).items()}
        if sorted(initial.values()) != list(range(1, len(initial) + 1)):
            raise LabelError(
                f"--conf labels must give the values 1..{len(initial)} without gaps (3D Slicer names the segments of "
                f"a result by the rank of their values), got {initial}."
            )
        clashes = {name: (value, stored[name]) for name, value in initial.items() if stored.get(name, value) != value}
        if clashes:
            raise LabelError(f"--conf labels contradicts the datastore's label values in {self.path}: {clashes}.")
        self._values = dict(stored)
        self.register(sorted(initial, key=initial.get))

    @property
    def values(self) -> dict[str, int]:
        """Every name and its value, by value."""
        return dict(sorted(self._values.items(), key=lambda item: item[1]))

    def register(self, names: Iterable[str]) -> dict[str, int]:
        """Give each unknown name the next value; returns the value of each of ``names``."""
        names = list(names)
        with self._lock:
            new = [name for name in dict.fromkeys(names) if name not in self._values]
            for name in new:
                self._values[name] = len(self._values) + 1
            if new:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                temporary = self.path.with_suffix(".tmp")
                temporary.write_text(json.dumps(self.values, indent=4))
                temporary.replace(self.path)
                logger.info(f"IRIS label values: {', '.join(f'{name} = {self._values[name]}' for name in new)}")
            return {name: self._values[name] for name in names}


def seg_nrrd_names(path: str | Path) -> dict[str, int]:
    """Segment name -> label value from the header of a 3D Slicer ``.seg.nrrd`` (``Segment<i>_Name``,
    ``Segment<i>_LabelValue``); empty for other files."""
    if not str(path).lower().endswith(".nrrd"):
        return {}
    fields: dict[str, str] = {}
    with open(path, "rb") as handle:
        for raw in handle:
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break  # the header ends at the first blank line
            if ":=" in line:
                key, value = line.split(":=", 1)
                fields[key] = value
    names = {}
    for key, name in fields.items():
        if key.startswith("Segment") and key.endswith("_Name"):
            value = fields.get(key[: -len("_Name")] + "_LabelValue")
            if value is not None and value.strip().isdigit():
                names[name] = int(value)
    return names


def names_in_info(info: Mapping) -> dict[str, int]:
    """Name -> value that a label's info gives: ``label_info`` (Slicer: ``name`` and ``idx``), ``label_names``
    (MONAI Label results), or the same inside ``params``."""
    names: dict[str, int] = {}
    for source in (info.get("params", {}), info):
        names.update({str(n): int(v) for n, v in (source.get("label_names") or {}).items()})
        for entry in source.get("label_info") or []:
            if isinstance(entry, Mapping) and "name" in entry and ("idx" in entry or "id" in entry):
                names[str(entry["name"])] = int(entry.get("idx", entry.get("id")))
    names.pop("background", None)
    return names


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Array (spatial dims) and affine of an image or label file, read by the bundle's readers; LabelError if it
    cannot be read."""
    from scripts.data.image_io import LoadImagesd, unreadable_reason  # the bundle's (on sys.path via IrisSettings)

    reason = unreadable_reason(path) if Path(path).exists() else "file not found"
    if reason:
        raise LabelError(reason)
    try:
        volume = LoadImagesd("image")({"image": str(path)})["image"]
    except Exception as error:  # any reader failure: the file is unusable, say why
        raise LabelError(f"cannot be read ({type(error).__name__}: {error})") from error
    return np.asarray(volume)[0], np.asarray(volume.affine)


@lru_cache(maxsize=256)
def _geometry(path: str, modified_ns: int) -> tuple[tuple[int, ...], np.ndarray]:
    array, affine = read_volume(path)
    return array.shape, affine


def image_geometry(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of an image (read once per file version); LabelError if it cannot be read."""
    return _geometry(str(path), Path(path).stat().st_mtime_ns)


def checked_label(label: str | Path, image: str | Path, names: Mapping[str, int]) -> dict[str, int]:
    """The name -> value map of the label map ``label`` of ``image``, restricted to the values it holds, after
    checking that it is readable, not empty, in the image's geometry and that every value it holds has a name.

    Raises:
        LabelError: naming the problem (the caller adds which volume).
    """
    array, affine = read_volume(label)
    shape, image_affine = image_geometry(image)
    if array.shape != shape:
        raise LabelError(f"the label has shape {tuple(array.shape)}, the image {tuple(shape)}")
    if not np.allclose(affine, image_affine, atol=1e-3):
        raise LabelError("the label's geometry (origin, spacing or direction) differs from the image's")
    values = sorted(int(v) for v in np.unique(array) if v != 0)
    if not values:
        raise LabelError("the label is empty (no labelled voxel)")
    by_value = {value: name for name, value in names.items()}
    unnamed = [value for value in values if value not in by_value]
    if unnamed:
        raise LabelError(
            f"label value(s) {unnamed} have no name: send label_info ([{{'name': ..., 'idx': value}}], as 3D Slicer "
            "does) or label_names, or start the server with --conf labels"
        )
    return {by_value[value]: value for value in values}
