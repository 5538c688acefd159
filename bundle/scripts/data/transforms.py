"""MONAI transform chains: deterministic per-subject preprocessing (cached) and random per-episode augmentation."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import (
    Compose,
    EnsureTyped,
    Invertd,
    InvertibleTransform,
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
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.utils import TraceKeys
from scipy import ndimage

from ..errors import IrisInputError

CT_WINDOW = (-990.0, 500.0)
PERCENTILES = (2.0, 98.0)
# The modality names of MSD and nnU-Net v2 dataset.json files (case-insensitive) and the normalisation each gets.
# Names not listed (ultrasound, endoscopy, dermoscopy, X-ray, ...) get "percentile", as MR does.
NORMALISATIONS = {
    "ct_window": ("CT",),  # clip to [-990, 500] HU, then z-score
    "percentile": ("MRI", "MR", "T1", "T1W", "T1GD", "T1C", "T2", "T2W", "FLAIR", "ADC", "DWI", "PET"),  # 2-98 %
    "zscore": ("ZSCORE",),  # nnU-Net's "zscore": z-score without clipping
    "rescale_to_0_1": ("RESCALE_TO_0_1",),  # nnU-Net's "rescale_to_0_1": min-max to [0, 1]
    "none": ("NONORM",),  # nnU-Net's "noNorm": intensities as they are
}
LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


def is_single_slice(volume: torch.Tensor) -> bool:
    """Whether a channel-first volume is a 2D image (a trailing spatial axis of size 1)."""
    return volume.shape[-1] == 1


class ImageChannelsd(MapTransform):
    """Match a 2D image's channels to the network's: RGB(A) becomes luminance for 1 channel, RGBA drops alpha for 3.

    Raises:
        ValueError: naming the file when its channels cannot be matched.
    """

    def __init__(self, keys: KeysCollection, channels: int = 1) -> None:
        super().__init__(keys)
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image, found = d[key], d[key].shape[0]
            if found == self.channels:
                continue
            if image.dim() != 3 or found not in (3, 4) or self.channels not in (1, 3):  # only 2D images are RGB(A)
                name = image.meta.get("filename_or_obj", key) if isinstance(image, MetaTensor) else key
                raise ValueError(f"{name}: has {found} channels, the network takes in_channels={self.channels}.")
            rgb = image[:3].float()
            weights = torch.as_tensor(LUMINANCE, dtype=rgb.dtype, device=rgb.device).view(3, *[1] * (rgb.dim() - 1))
            d[key] = (rgb * weights).sum(0, keepdim=True) if self.channels == 1 else rgb
        return d


class AppendCoordinatesd(MapTransform):
    """Append each voxel's place in the volume (-1 to 1 along each axis, in RAS order) as three image channels.

    Crops and sliding windows then carry where in the volume they lie, which a patch that sees a small part of a large
    volume cannot show, and which can tell a structure from a similar one elsewhere. It assumes that the volumes of a
    dataset frame the same anatomy (brains, whole-body scans), not arbitrary fields of view.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            axes = [torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1) for n in image.shape[1:]]
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).to(image.device, image.dtype)
            joined = torch.cat([torch.as_tensor(image), grid])
            d[key] = (
                MetaTensor(joined, meta=image.meta, applied_operations=image.applied_operations)
                if isinstance(image, MetaTensor)
                else joined
            )
        return d


class AddSliceAxisd(MapTransform, InvertibleTransform):
    """Make a 2D image (C x H x W) a single-slice volume (C x H x W x 1) so the 3D network and transforms apply.

    The inverse removes the axis again, so predictions of a 2D query are written as a 2D mask.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].dim() != 3:
                continue
            volume = MetaTensor(d[key]).unsqueeze(-1)
            volume.affine = to_affine_nd(3, volume.affine)
            self.push_transform(volume)
            d[key] = volume
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if self._applied(d[key]):
                self.pop_transform(d[key])
                d[key] = d[key].squeeze(-1)
                d[key].affine = to_affine_nd(2, d[key].affine)
        return d

    def _applied(self, volume: torch.Tensor) -> bool:
        operations = volume.applied_operations if isinstance(volume, MetaTensor) else []
        return bool(operations) and operations[-1][TraceKeys.CLASS_NAME] == type(self).__name__


class VolumeSpacingd(Spacingd):
    """``Spacingd`` for volumes only: single-slice (2D) images keep their pixel spacing (PNG has none)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict:
        if all(is_single_slice(data[key]) for key in self.key_iterator(dict(data))):
            return dict(data)
        return super().__call__(data, lazy)

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        key = next(iter(self.key_iterator(dict(data))), None)
        volume = data[key] if key is not None else None
        if not isinstance(volume, MetaTensor) or not volume.applied_operations:
            return dict(data)
        if volume.applied_operations[-1][TraceKeys.CLASS_NAME] != "SpatialResample":
            return dict(data)  # this image was a single slice: nothing was resampled
        return super().inverse(data)


def normalisation(modality: str) -> str:
    """The intensity normalisation of a modality name (see ``NORMALISATIONS``; unknown names: ``percentile``)."""
    name = str(modality).strip().upper()
    return next((norm for norm, names in NORMALISATIONS.items() if name in names), "percentile")


def intensity_normalization(modality: str, keys: Sequence[str] = ("image",)) -> Compose:
    """The normalisation of ``modality`` (see :func:`normalisation`): CT clipped to [-990, 500] HU then z-scored;
    MR, PET and other names clipped to their 2nd-98th percentile then z-scored; nnU-Net's ``zscore``,
    ``rescale_to_0_1`` and ``noNorm`` as nnU-Net names them.

    Args:
        modality: the dataset's ``modality`` entry (case-insensitive).
        keys: image keys to normalise.
    """
    kind = normalisation(modality)
    if kind == "ct_window":
        low, high = CT_WINDOW
        steps = [ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=low, b_max=high, clip=True)]
    elif kind == "percentile":
        low, high = PERCENTILES
        # to [0, 1] with clipping: the z-score after it makes the scale irrelevant (b_min=None cannot clip)
        steps = [ScaleIntensityRangePercentilesd(keys, lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True)]
    elif kind == "rescale_to_0_1":
        return Compose([ScaleIntensityd(keys, minv=0.0, maxv=1.0)])
    elif kind == "none":
        return Compose([])
    else:
        steps = []
    return Compose([*steps, NormalizeIntensityd(keys)])


NATIVE_SPACING = ("native", "none", "null")


def target_spacing_or_native(value: Sequence[float] | str | None) -> list[float] | None:
    """A ``target_spacing`` setting as mm per axis, or None to keep each image's own spacing.

    ``native`` (or ``None``/``null``) keeps native spacing: ``--target_spacing native`` works from the command line,
    where MONAI drops a ``None`` override silently.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in NATIVE_SPACING):
        return None
    if isinstance(value, str) or not all(isinstance(v, (int, float)) and v > 0 for v in value):
        raise IrisInputError(
            f"target_spacing must be positive mm per axis, e.g. [1.5, 1.5, 1.5], or 'native'; got {value!r}."
        )
    return [float(v) for v in value]


def subject_preprocessing(
    modality: str,
    target_spacing: Sequence[float] | None,
    keys: Sequence[str] = ("image", "label"),
    track_meta: bool = False,
    in_channels: int = 1,
    coordinate_channels: bool = False,
) -> Compose:
    """Deterministic steps after loading: image channels, 2D as single slice, RAS, resampling, intensities, and
    optionally the voxels' places in the volume.

    Args:
        modality: the dataset's modality, which picks the intensity normalisation.
        target_spacing: voxel spacing in mm, or None (``"native"``) to keep each image's own spacing; 2D images keep
            theirs.
        keys: ``"image"`` and optionally ``"label"`` (resampled with nearest neighbours).
        track_meta: keep MetaTensors (inference needs them to invert the transforms); training drops them.
        in_channels: the network's image channels; RGB images are converted to match (see :class:`ImageChannelsd`).
        coordinate_channels: append the voxels' places as channels (see :class:`AppendCoordinatesd`).
    """
    modes = ["nearest" if key == "label" else "bilinear" for key in keys]
    steps = [
        ImageChannelsd("image", in_channels),
        AddSliceAxisd(keys),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    target_spacing = target_spacing_or_native(target_spacing)
    if target_spacing is not None:
        steps.append(VolumeSpacingd(keys=keys, pixdim=tuple(target_spacing), mode=modes))
    steps.append(intensity_normalization(modality))
    if coordinate_channels:
        steps.append(AppendCoordinatesd("image"))
    steps.append(EnsureTyped(keys=keys, track_meta=track_meta))
    return Compose(steps)


def episode_augmentation(
    patch_size: Sequence[int],
    rotation_degrees: float = 10.0,
    scale_range: float = 0.1,
    translation_fraction: float = 0.05,
    flip_prob: float = 0.5,
    flip_axes: Sequence[int] = (0, 1, 2),
    intensity_scale: float = 0.15,
    intensity_shift: float = 0.1,
    augmentation_prob: float = 0.5,
) -> Compose:
    """Random spatial and intensity augmentation applied independently to every support and query patch.

    Items: ``image``, ``label`` and optionally ``coordinates`` (channels of :class:`AppendCoordinatesd`, which the
    spatial transforms move with the image and the intensity transforms leave alone).

    Defaults follow the user's guide: rotation ±10°, scale 0.9-1.1, small translations, flips, intensity scale and
    shift, gamma, blur and noise. A 2-element ``patch_size`` gives the in-plane version for 2D (H x W) patches.

    Args:
        patch_size: patch size, used to express translations in voxels; its length sets 2D or 3D.
        rotation_degrees: maximum absolute rotation about each axis.
        scale_range: maximum relative zoom change.
        translation_fraction: maximum translation as a fraction of the patch size.
        flip_prob: probability of a flip along each of ``flip_axes``.
        flip_axes: spatial axes that may be flipped. Leave out the axes along which anatomy is not symmetric in
            meaning, e.g. ``[]`` for brain parcels with left and right regions: a flipped reference would show a
            left region where a right one lies (inference mirrors windows only along these axes, see
            ``sw_mirror_axes``).
        intensity_scale: maximum relative intensity scaling.
        intensity_shift: maximum intensity offset (in z-score units).
        augmentation_prob: probability of each non-flip transform.
    """
    keys = ("image", "label", "coordinates")  # coordinates (see AppendCoordinatesd) move with the image
    radians = rotation_degrees * 3.141592653589793 / 180.0
    translate = [translation_fraction * size for size in patch_size]
    dims = len(patch_size)
    p = augmentation_prob
    return Compose(
        [
            RandAffined(
                keys,
                prob=p,
                rotate_range=(radians,) * (1 if dims == 2 else 3),
                scale_range=(scale_range,) * dims,
                translate_range=translate,
                mode=("bilinear", "nearest", "bilinear"),
                padding_mode=("zeros", "zeros", "border"),
                allow_missing_keys=True,
            ),
            *[
                RandFlipd(keys, prob=flip_prob, spatial_axis=axis, allow_missing_keys=True)
                for axis in flip_axes
                if axis < dims
            ],
            RandScaleIntensityd("image", factors=intensity_scale, prob=p),
            RandShiftIntensityd("image", offsets=intensity_shift, prob=p),
            RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=p / 2),
            RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=p / 4),
            RandGaussianNoised("image", std=0.05, prob=p / 4),
        ]
    )


def label_map(scores: torch.Tensor, label_values: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """K x ... per-class scores -> 1 x ... map of ``label_values``: each voxel takes its highest-scoring class if that
    score is above ``threshold``, else 0. No K-channel probability buffer is made."""
    best, index = scores.max(dim=0, keepdim=True)
    labels = label_values.to(index.device)[index]
    return torch.where(best > threshold, labels, torch.zeros_like(labels))


class InvertedLabelMapd(MapTransform):
    """Per-class logits on the processing grid (K x D x H x W) -> one label map on the query's grid (1 x ...).

    Each class's probabilities go back to the query's grid (the inverse of ``transform``, with its linear
    interpolation) before the classes are compared, as nnU-Net resamples probabilities rather than a label map: thin
    structures keep smooth borders instead of the steps of nearest-neighbour upsampling. One class at a time, so that
    memory holds a fixed number of query-sized buffers whatever the number of classes. Each voxel takes the class of
    highest probability among those above 0.5, or 0.

    Args:
        keys: keys of the logits.
        transform: the preprocessing that made the processing grid.
        orig_key: the key of the query image it was applied to.
        label_values: output value of each class channel, in channel order.
    """

    def __init__(
        self, keys: KeysCollection, transform: InvertibleTransform, orig_key: str, label_values: Sequence[int]
    ) -> None:
        super().__init__(keys)
        self.invert = Invertd("probability", transform, orig_keys=orig_key, nearest_interp=False)
        self.orig_key = orig_key
        self.label_values = [int(value) for value in label_values]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            logits = d[key]
            labels = best = probability = None
            for k, value in enumerate(self.label_values):
                channel = torch.sigmoid(logits[k : k + 1].float())
                probability = self.invert({"probability": channel, self.orig_key: d[self.orig_key]})["probability"]
                if labels is None:
                    labels = torch.zeros(probability.shape, dtype=torch.int16, device=probability.device)
                    best = torch.full(probability.shape, 0.5, device=probability.device)
                better = probability.as_tensor() > best
                labels.masked_fill_(better, value)
                torch.maximum(best, probability.as_tensor(), out=best)
            d[key] = MetaTensor(labels, meta=probability.meta, applied_operations=probability.applied_operations)
        return d


def voxel_volume(image: torch.Tensor) -> float:
    """mm³ of one voxel of a MetaTensor (batched or not), from its affine."""
    if not isinstance(image, MetaTensor):
        raise TypeError("A voxel's volume needs a MetaTensor: its affine gives the voxel sizes.")
    affine = torch.as_tensor(image.affine).double()
    affine = affine[0] if affine.dim() == 3 else affine
    return abs(float(torch.det(affine[:3, :3])))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of a boolean array (all False when it is empty).

    scipy's ``ndimage.label``, not MONAI's ``get_largest_connected_component_mask``, which needs scikit-image (not a
    bundle requirement).
    """
    components, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    return components == int(np.argmax(np.bincount(components.ravel())[1:])) + 1


class KeepLargestComponentd(MapTransform):
    """In label maps (1 x D x H x W of label values), keep only each class's largest connected component.

    For anatomy where every structure is one object (organs, brain regions), voxels of a class away from its main
    object are false positives: nnU-Net's post-processing. Each class is labelled within its bounding box, so the
    cost follows the structures, not the volume; label values are positive integers. MONAI's
    ``KeepLargestConnectedComponentd`` does the same with scikit-image, not a bundle requirement.

    Args:
        keys: keys of the label maps.
        allow_missing_keys: don't raise for keys that are absent.
    """

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = d[key]
            array = np.asarray(torch.as_tensor(labels).detach().cpu())
            kept = np.zeros_like(array)
            # find_objects gives each label value present its bounding box (None for absent values), in one pass
            for value, box in enumerate(ndimage.find_objects(array.astype(np.int32, copy=False)), start=1):
                if box is not None:
                    kept[box][largest_component(array[box] == value)] = value
            if isinstance(labels, MetaTensor):
                kept = MetaTensor(kept, meta=labels.meta, applied_operations=labels.applied_operations)
            d[key] = torch.as_tensor(kept, device=labels.device) if isinstance(labels, torch.Tensor) else kept
        return d
