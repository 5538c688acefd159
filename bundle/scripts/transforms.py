"""MONAI transform chains: deterministic per-subject preprocessing (cached) and random per-episode augmentation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

CT_WINDOW = (-990.0, 500.0)
PERCENTILES = (2.0, 98.0)
CT_MODALITIES = ("CT",)


def intensity_normalization(modality: str, keys: Sequence[str] = ("image",)) -> Compose:
    """Clip by modality, then z-score: CT to [-990, 500] HU, anything else (MR, PET, ...) to its 2nd-98th percentile.

    Args:
        modality: the dataset's ``modality`` entry (case-insensitive).
        keys: image keys to normalise.
    """
    if modality.upper() in CT_MODALITIES:
        low, high = CT_WINDOW
        clip = ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=low, b_max=high, clip=True)
    else:
        low, high = PERCENTILES
        clip = ScaleIntensityRangePercentilesd(keys, lower=low, upper=high, b_min=None, b_max=None, clip=True)
    return Compose([clip, NormalizeIntensityd(keys)])


def subject_preprocessing(
    modality: str,
    target_spacing: Sequence[float] | None,
    keys: Sequence[str] = ("image", "label"),
    track_meta: bool = False,
) -> Compose:
    """Deterministic steps after loading: RAS orientation, optional resampling, intensity normalisation.

    Args:
        modality: the dataset's modality, which picks the intensity normalisation.
        target_spacing: voxel spacing in mm, or None to keep each image's own spacing.
        keys: ``"image"`` and optionally ``"label"`` (resampled with nearest neighbours).
        track_meta: keep MetaTensors (inference needs them to invert the transforms); training drops them.
    """
    modes = ["nearest" if key == "label" else "bilinear" for key in keys]
    steps = [Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if target_spacing is not None:
        steps.append(Spacingd(keys=keys, pixdim=tuple(target_spacing), mode=modes))
    steps.append(intensity_normalization(modality))
    steps.append(EnsureTyped(keys=keys, track_meta=track_meta))
    return Compose(steps)


def episode_augmentation(
    patch_size: Sequence[int],
    rotation_degrees: float = 10.0,
    scale_range: float = 0.1,
    translation_fraction: float = 0.05,
    flip_prob: float = 0.5,
    intensity_scale: float = 0.15,
    intensity_shift: float = 0.1,
    augmentation_prob: float = 0.5,
) -> Compose:
    """Random spatial and intensity augmentation applied independently to every support and query patch.

    Defaults follow the user's guide: rotation ±10°, scale 0.9-1.1, small translations, flips, intensity scale and
    shift, gamma, blur and noise.

    Args:
        patch_size: patch size, used to express translations in voxels.
        rotation_degrees: maximum absolute rotation about each axis.
        scale_range: maximum relative zoom change.
        translation_fraction: maximum translation as a fraction of the patch size.
        flip_prob: probability of a flip along each axis.
        intensity_scale: maximum relative intensity scaling.
        intensity_shift: maximum intensity offset (in z-score units).
        augmentation_prob: probability of each non-flip transform.
    """
    keys = ("image", "label")
    radians = rotation_degrees * 3.141592653589793 / 180.0
    translate = [translation_fraction * size for size in patch_size]
    p = augmentation_prob
    return Compose(
        [
            RandAffined(
                keys,
                prob=p,
                rotate_range=(radians,) * 3,
                scale_range=(scale_range,) * 3,
                translate_range=translate,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            *[RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)],
            RandScaleIntensityd("image", factors=intensity_scale, prob=p),
            RandShiftIntensityd("image", offsets=intensity_shift, prob=p),
            RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=p / 2),
            RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=p / 4),
            RandGaussianNoised("image", std=0.05, prob=p / 4),
        ]
    )


class LogitsToLabelMapd(MapTransform):
    """Per-class logits (K x D x H x W) -> one label map (1 x D x H x W) of the classes' label values.

    Each voxel takes the class of highest probability among those above 0.5 (logit > 0), or 0; no K-channel
    probability buffer is kept.

    Args:
        keys: keys of the logits.
        label_values: output value of each class channel, in channel order.
    """

    def __init__(self, keys: KeysCollection, label_values: Sequence[int]) -> None:
        super().__init__(keys)
        self.label_values = torch.as_tensor(list(label_values), dtype=torch.int16)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            logits = d[key]
            best, index = logits.max(dim=0, keepdim=True)
            labels = self.label_values.to(index.device)[index]
            labels = torch.where(best > 0, labels, torch.zeros_like(labels))
            d[key] = (
                MetaTensor(labels, meta=logits.meta, applied_operations=logits.applied_operations)
                if isinstance(logits, MetaTensor)
                else labels
            )
        return d
