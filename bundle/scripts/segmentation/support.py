"""Reference (support) volumes for in-context inference: loading, checks, and patches around each class."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

from ..data.image_io import LoadImagesd, unreadable_reason
from ..data.patches import binary_masks, bounding_box_centre, crop_around
from ..data.pool import Subject
from ..data.transforms import subject_preprocessing, voxel_volume
from ..errors import IrisInputError


class SupportSetError(IrisInputError):
    """A problem with the references, raised before any heavy work with the file and class named."""


@dataclass
class Reference:
    """A preprocessed reference volume and where each requested class lies in it."""

    path: str
    subject: Subject  # image and label 1 x D x H x W, ``foreground`` holds all voxels of each class
    voxel_volume: float | None = None  # mm³, where the reference was read from a file

    def volume(self, value: int) -> float:
        """mm³ of class ``value`` in this reference."""
        if self.voxel_volume is None:
            raise ValueError(f"The voxel size of {self.path} is unknown.")
        return self.subject.voxels.get(value, 0) * self.voxel_volume

    def patch(self, value: int, patch_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (1 x P) and binary mask (1 x P) of class ``value``, centred on the class's bounding box."""
        image, label = self._crop(value, patch_size)
        return image, binary_masks(label, [value], 1)

    def labelled_patch(
        self, value: int, values: Sequence[int], patch_size: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The patch of :meth:`patch` with the mask of every class in ``values`` (K x P) and which of them this
        reference labels (K, bool): a class it labels is known everywhere in it, present in the patch or not."""
        image, label = self._crop(value, patch_size)
        labelled = self.subject.classes
        return image, binary_masks(label, values, len(values)), torch.tensor([v in labelled for v in values])

    def _crop(self, value: int, patch_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return crop_around(self.subject, bounding_box_centre(self.subject.foreground[value]), patch_size)


def preprocessing(
    modality: str,
    target_spacing: Sequence[float] | None,
    keys: Sequence[str],
    track_meta: bool = False,
    in_channels: int = 1,
    coordinate_channels: bool = False,
) -> Compose:
    """Load, channel-first, then the same deterministic preprocessing as training (orientation, spacing, intensity,
    the voxels' places with ``coordinate_channels``).

    Queries keep their metadata (``track_meta``) so that predictions can be inverted to the query's geometry.
    """
    steps = subject_preprocessing(
        modality, target_spacing, keys, track_meta, in_channels=in_channels, coordinate_channels=coordinate_channels
    )
    return Compose([LoadImagesd(keys), *steps.transforms])


def load_references(
    images: Sequence[str],
    labels: Sequence[str],
    classes: Mapping[str, int],
    modality: str = "CT",
    target_spacing: Sequence[float] | None = None,
    in_channels: int = 1,
    coordinate_channels: bool = False,
) -> list[Reference]:
    """Load and check reference volumes; every requested class must be labelled in at least one of them.

    A class is taken from the references that label it, so references may label different subsets of the classes.

    Args:
        images: reference image paths.
        labels: reference label-map paths, one per image.
        classes: class name -> label value in the reference label maps.
        modality: modality of the references (and queries), which picks the intensity normalisation.
        target_spacing: resampling spacing, the one used in training, or None.
        in_channels: the network's image channels (RGB references are converted to match).
        coordinate_channels: whether the network takes the voxels' places as channels too, as in training.

    Raises:
        SupportSetError: naming every missing file or mismatched label map, and every class no reference labels.
    """
    if len(images) != len(labels) or not images:
        raise SupportSetError(f"Give as many support_labels as support_images (got {len(images)} and {len(labels)}).")
    if not classes:
        raise SupportSetError("'classes' is empty: map at least one class name to its label value.")
    missing = [path for path in [*images, *labels] if not Path(path).exists()]  # a DICOM series is a folder
    if missing:
        raise SupportSetError(f"Support files not found: {missing}")
    unreadable = [f"{path}: {reason}" for path in [*images, *labels] if (reason := unreadable_reason(path))]
    if unreadable:
        raise SupportSetError("Unreadable support files: " + "; ".join(unreadable))
    transform = preprocessing(
        modality, target_spacing, ("image", "label"), track_meta=True, in_channels=in_channels,
        coordinate_channels=coordinate_channels,
    )  # fmt: skip
    references, problems = [], []
    for image_path, label_path in zip(images, labels):
        data = transform({"image": image_path, "label": label_path})
        voxel = voxel_volume(data["label"])
        image, label = data["image"].as_tensor().float(), data["label"].as_tensor().round().to(torch.int16)
        if image.shape[1:] != label.shape[1:]:
            problems.append(f"{label_path}: shape {tuple(label.shape[1:])} differs from {tuple(image.shape[1:])}")
            continue
        foreground = {}
        for value in classes.values():
            coords = np.argwhere(label[0].numpy() == value)
            if len(coords):
                foreground[value] = coords
        voxels = {value: len(coords) for value, coords in foreground.items()}
        subject = Subject(0, image_path, foreground, voxels, tuple(label.shape[1:]), tensors=(image, label))
        references.append(Reference(label_path, subject, voxel))
    for name, value in classes.items():
        if not problems and not any(value in reference.subject.classes for reference in references):
            problems.append(f"class '{name}' (label value {value}) is labelled in none of {list(labels)}")
    if problems:
        raise SupportSetError("Invalid references:\n" + "\n".join(f"  - {problem}" for problem in problems))
    return references
