"""A local datastore that refuses, with an HTTP 4xx that says why, any image or label that would break inference."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from .labels import LabelError, LabelRegistry, checked_label, read_volume
from .references import label_names

logger = logging.getLogger(__name__)


class CheckedDatastore(LocalDatastore):
    """MONAI Label's ``LocalDatastore`` whose uploads are checked before they are stored.

    - an image must be readable (422 otherwise);
    - a label must be readable, hold labelled voxels, have its image's shape and geometry, and name every value it
      holds (``label_info`` as 3D Slicer sends it, ``label_names``, ``.seg.nrrd`` segment names or ``--conf labels``;
      422 otherwise, naming the volume and the values). Its names are registered in the app's name -> value map and
      kept with the label (``label_names``), so every later reader matches classes by name.

    Args:
        registry: the app's name -> value map.
        default_names: names for values that a label does not name itself (``--conf labels``).
        args, kwargs: those of ``LocalDatastore``.
    """

    def __init__(self, *args: Any, registry: LabelRegistry, default_names: Mapping[str, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.registry = registry
        self.default_names = dict(default_names)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        try:
            read_volume(image_filename)
        except LabelError as error:
            raise HTTPException(status_code=422, detail=f"Image {image_id or image_filename} refused: {error}.")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"Unknown image id {image_id!r}: it is not in the datastore.")
        info = dict(label_info or {})
        names = label_names(label_filename, info, self.default_names)
        try:
            names = checked_label(label_filename, self.get_image_uri(image_id), names)
        except LabelError as error:
            raise HTTPException(status_code=422, detail=f"Label of {image_id} ({label_tag}) refused: {error}.")
        info["label_names"] = names  # this file's own values; the app's values are in the registry
        self.registry.register(names)
        return super().save_label(image_id, label_filename, label_tag, info)
