"""The datastore's finished labels as IRIS references: which volumes, which label values, and their names."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

logger = logging.getLogger(__name__)


@dataclass
class DatastoreReferences:
    """Labelled volumes of the datastore and the classes they show (class name -> label value)."""

    images: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)


def label_names(info: Mapping, values: list[int], default_names: Mapping[str, int]) -> dict[int, str]:
    """Name of each label value: from the label's info as 3D Slicer saves it (``label_info``: name and idx), or as
    MONAI Label results carry it (``label_names``: name -> value), else from the app's ``--conf labels``, else
    ``label_<value>``."""
    names: dict[int, str] = {int(v): n for n, v in default_names.items()}
    names.update({int(v): str(n) for n, v in info.get("params", {}).get("label_names", {}).items()})
    names.update({int(v): str(n) for n, v in info.get("label_names", {}).items()})
    names.update({int(entry["idx"]): str(entry["name"]) for entry in info.get("label_info", []) if "idx" in entry})
    return {value: names.get(value, f"label_{value}") for value in values}


@lru_cache(maxsize=1024)
def _label_values(path: str, modified: float) -> tuple[int, ...]:
    """Non-zero values of a label map; cached per file version, so a request re-reads only new or changed labels."""
    from scripts.data.image_io import LoadImagesd  # the bundle's readers (on sys.path once IrisSettings is made)

    return tuple(int(v) for v in np.unique(np.asarray(LoadImagesd("label")({"label": path})["label"])) if v != 0)


def collect_references(
    datastore: Datastore, exclude_image: str | None = None, default_names: Mapping[str, int] | None = None
) -> DatastoreReferences:
    """Every volume with a final label (except the query itself) and every non-zero value its label map holds.

    A value keeps the first name found for it; references may label different subsets of the classes (the bundle
    takes each class from the references that hold it).
    """
    references = DatastoreReferences()
    names_by_value: dict[int, str] = {}
    for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL)):
        image_uri = datastore.get_image_uri(image_id)
        if exclude_image and image_uri == exclude_image:
            continue
        label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
        label_uri = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL)
        values = list(_label_values(label_uri, os.path.getmtime(label_uri)))
        if not values:
            logger.info(f"IRIS: {label_uri} is empty; not used as a reference")
            continue
        info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL) or {}
        for value, name in label_names(info, values, default_names or {}).items():
            names_by_value.setdefault(value, name)
        references.images.append(image_uri)
        references.labels.append(label_uri)
    for value, name in sorted(names_by_value.items()):
        references.classes[name if name not in references.classes else f"{name}_{value}"] = value
    return references
