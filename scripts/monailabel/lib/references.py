"""The datastore's finished labels as IRIS references, matched by class name and written in the app's label values.

Each label keeps the name -> value map it was saved with (see :mod:`.labels`). For the bundle, which takes one
name -> value map for all references, every label map is rewritten once in the app's values (a cached copy in the
datastore's ``.iris`` folder, renewed when the label changes). A label that cannot be used (unreadable, empty, another
geometry than its image, values without names: e.g. copied into the datastore by hand) is skipped with a warning,
so that one bad file never stops inference on the others.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from .labels import LabelError, LabelRegistry, checked_label, names_in_info, read_volume, seg_nrrd_names

logger = logging.getLogger(__name__)

CANONICAL_DIR = Path(".iris") / "labels"


@dataclass
class DatastoreReferences:
    """Labelled volumes of the datastore, their label maps in the app's values, and the classes they show."""

    images: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # copies in the app's values
    classes: dict[str, int] = field(default_factory=dict)  # class name -> the app's value
    per_volume: list[dict[str, int]] = field(default_factory=list)  # the classes each volume labels
    warnings: list[str] = field(default_factory=list)


def label_names(label_path: str, info: Mapping, default_names: Mapping[str, int]) -> dict[str, int]:
    """Name -> value of a saved label: the app's ``--conf labels``, overridden by the file's own segment metadata
    (``.seg.nrrd``), overridden by what the label was saved with (``label_info``, ``label_names``)."""
    return {**default_names, **seg_nrrd_names(label_path), **names_in_info(info)}


def canonical_label(label_path: str, names: Mapping[str, int], values: Mapping[str, int], folder: Path) -> str:
    """``label_path`` rewritten in the app's ``values`` (class name -> value), cached by file version and maps."""
    source = Path(label_path)
    stat = source.stat()
    key = repr((str(source.resolve()), stat.st_mtime_ns, stat.st_size, sorted(names.items()), sorted(values.items())))
    target = folder / f"{source.name.split('.')[0]}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.nii.gz"
    if target.is_file():
        return str(target)
    array, affine = read_volume(source)
    canonical = np.zeros(array.shape, dtype=np.int16)
    for name, value in names.items():
        canonical[array == value] = values[name]
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{source.name.split('.')[0]}_*.nii.gz"):
        old.unlink()  # an earlier version of this label
    temporary = target.with_name(f".{target.name}")
    nib.save(nib.Nifti1Image(canonical, affine), str(temporary))
    temporary.replace(target)
    return str(target)


def collect_references(
    datastore: Datastore,
    registry: LabelRegistry,
    datastore_root: Path,
    exclude_image: str | None = None,
    default_names: Mapping[str, int] | None = None,
) -> DatastoreReferences:
    """Every volume with a final label (except the query itself), its classes by name, its label map in the app's
    values; unusable labels are skipped and named in ``warnings``."""
    references = DatastoreReferences()
    for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL)):
        image_uri = datastore.get_image_uri(image_id)
        if exclude_image and image_uri == exclude_image:
            continue
        label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
        label_uri = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL)
        info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL) or {}
        try:
            names = checked_label(label_uri, image_uri, label_names(label_uri, info, default_names or {}))
        except LabelError as error:
            references.warnings.append(f"the label of {image_id} is not used: {error}")
            logger.warning(f"IRIS: the label of {image_id} ({label_uri}) is not used: {error}")
            continue
        values = registry.register(names)
        references.images.append(image_uri)
        references.labels.append(canonical_label(label_uri, names, values, datastore_root / CANONICAL_DIR))
        references.per_volume.append(values)
        references.classes.update(values)
    references.classes = dict(sorted(references.classes.items(), key=lambda item: item[1]))
    return references
