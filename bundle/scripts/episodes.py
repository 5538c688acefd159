"""Episodes over a dataset pool: training episodes (support + query patches) and 1-shot validation cases.

Every item is a pure function of ``(seed, index)``, so episodes are reproducible whatever the number of DataLoader
workers or ranks, and a resumed run continues the exact sequence by skipping the episodes already used (``start``).

2D images are single-slice volumes (H x W x 1): their patches are ``(P_D, P_H, 1)`` for a configured patch size
``(P_D, P_H, P_W)`` and they are augmented in-plane, with the same network and configs as 3D data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import SpatialCrop, SpatialPad
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from .pool import DatasetPool, DatasetPoolError, Subject
from .transforms import episode_augmentation, is_single_slice


def patch_size_for(volume: torch.Tensor, patch_size: Sequence[int]) -> tuple[int, ...]:
    """``patch_size`` for a C x D x H x W volume: depth 1 on the last axis for a single-slice (2D) image."""
    return (*patch_size[:-1], 1) if is_single_slice(volume) else tuple(patch_size)


def crop_patch(volume: torch.Tensor, center: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """Crop a C x D x H x W volume to ``patch_size`` (see :func:`patch_size_for`) around ``center``, zero-padded."""
    size = list(patch_size_for(volume, patch_size))
    crop = SpatialCrop(roi_center=[int(c) for c in center], roi_size=size)
    return convert_to_tensor(SpatialPad(spatial_size=size)(crop(volume)), track_meta=False)


def bounding_box_centre(coords: np.ndarray | torch.Tensor) -> list[int]:
    """Centre of the bounding box of N x 3 voxel coordinates."""
    coords = torch.as_tensor(coords)
    return ((coords.min(0).values + coords.max(0).values) // 2).tolist()


def crop_around(subject: Subject, center: Sequence[int], patch_size: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Crop image and label (1 x D x H x W each) to ``patch_size`` around ``center``, zero-padding at the borders."""
    return tuple(crop_patch(volume, center, patch_size) for volume in subject.volumes())


def binary_masks(label: torch.Tensor, values: Sequence[int], num_slots: int) -> torch.Tensor:
    """One binary channel per class value (K_max x D x H x W, uint8); slots beyond ``values`` stay empty."""
    masks = torch.zeros((num_slots, *label.shape[1:]), dtype=torch.uint8)
    for slot, value in enumerate(values):
        masks[slot] = label[0] == value
    return masks


class EpisodeDataset(Dataset):
    """Random training episodes, ``length`` of them, drawn from a pool.

    One episode: pick a dataset (by ``dataset_weights``, one draw per batch so that a batch never mixes datasets, nor
    2D and 3D patches), a trainable class, a query subject that has it and
    ``k_shot`` *different* support subjects that have it; crop patches around its foreground; keep up to
    ``max_classes`` classes present in every support patch (randomly dropping extra classes); augment support and
    query independently; perturb the query with Gaussian noise. Held-out classes never appear.

    Items (``K = max_classes``, ``S = k_shot``, ``P = patch size``):
        ``support_image`` S x 1 x P, ``support_mask`` S x K x P (uint8), ``query_image`` 1 x P,
        ``query_mask`` K x P (uint8), ``class_valid`` K (bool), ``class_ids`` K (long, index into
        ``pool.class_names``, -1 for padding), ``subject_ids`` S + 1 (indices into ``pool.subjects``, query first).

    Args:
        pool: training subjects.
        length: number of episodes (iterations x batch size).
        patch_size: patch size ``(D, H, W)``.
        k_shot: support subjects per episode.
        max_classes: classes per episode, ``K``.
        random_class_drop_prob: probability of dropping each extra class.
        query_noise_std: standard deviation of the Gaussian noise added to the query.
        dataset_weights: sampling weight per dataset; None samples proportionally to dataset size.
        seed: base seed of every episode.
        augmentation_kwargs: options of :func:`scripts.transforms.episode_augmentation`.
        self_support: let a class held by at most ``k_shot`` subjects train with a subject as its own support
            (another crop, augmented independently). For fine-tuning on the few volumes an annotator has labelled.
        batch_size: consecutive episodes drawn from the same dataset: the batch size times the number of ranks (a
            ``DistributedSampler`` without shuffling gives each rank a stride of that run).
    """

    def __init__(
        self,
        pool: DatasetPool,
        length: int,
        patch_size: Sequence[int],
        k_shot: int = 1,
        max_classes: int = 4,
        random_class_drop_prob: float = 0.15,
        query_noise_std: float = 0.05,
        dataset_weights: Sequence[float] | None = None,
        seed: int = 0,
        augmentation_kwargs: dict | None = None,
        self_support: bool = False,
        batch_size: int = 1,
    ) -> None:
        if k_shot < 1 or max_classes < 1 or length < 1 or batch_size < 1:
            raise ValueError(
                f"k_shot, max_classes_per_episode, batch_size and the episode count (total_iterations x batch_size) "
                f"must be >= 1, got {k_shot}, {max_classes}, {batch_size}, {length}."
            )
        self.pool = pool
        self.length = length
        self.patch_size = tuple(patch_size)
        self.k_shot = k_shot
        self.max_classes = max_classes
        self.drop_prob = random_class_drop_prob
        self.query_noise_std = query_noise_std
        self.seed = seed
        self.self_support = self_support
        self.start = 0  # episodes already consumed by a resumed run
        self.batch_size = batch_size
        self.augment = episode_augmentation(self.patch_size, **(augmentation_kwargs or {}))
        self.augment_2d = episode_augmentation(self.patch_size[:2], **(augmentation_kwargs or {}))
        self._holders = self._class_holders()
        self._weights = self._dataset_weights(dataset_weights)

    def _class_holders(self) -> list[dict[int, list[int]]]:
        """Per dataset: trainable class value -> subjects holding it (k_shot + 1 or more; 1 with self_support)."""
        holders: list[dict[int, list[int]]] = [{} for _ in self.pool.datasets]
        for index, subject in enumerate(self.pool.subjects):
            for value in subject.classes:
                if not self.pool.is_held_out(subject.dataset, value):
                    holders[subject.dataset].setdefault(value, []).append(index)
        needed = 1 if self.self_support else self.k_shot + 1
        usable = [{v: s for v, s in h.items() if len(s) >= needed} for h in holders]
        if not any(usable):
            raise DatasetPoolError(
                f"No trainable class appears in more than k_shot={self.k_shot} training subjects of the pool: "
                "an episode needs a query and k_shot different support subjects sharing a class "
                "(self_support=true lets a subject support itself)."
            )
        return usable

    def _dataset_weights(self, weights: Sequence[float] | None) -> np.ndarray:
        sizes = np.array([sum(1 for s in self.pool.subjects if s.dataset == d) for d in range(len(self.pool.datasets))])
        if weights is None:
            weights = sizes
        weights = np.asarray(weights, dtype=float)
        if weights.shape != sizes.shape or (weights < 0).any():
            raise ValueError(f"data_pool_weights must be {len(sizes)} non-negative numbers, got {weights.tolist()}.")
        weights = np.where([bool(h) for h in self._holders], weights, 0.0)
        if weights.sum() <= 0:
            raise ValueError("data_pool_weights give zero weight to every dataset with trainable classes.")
        return weights / weights.sum()

    def __len__(self) -> int:
        return self.length - self.start

    def _patch(self, rng: np.random.Generator, subject: Subject, value: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop around a random foreground voxel of ``value``, jittered by up to a quarter patch."""
        coords = subject.foreground[value]
        image, label = subject.volumes()
        size = patch_size_for(image, self.patch_size)
        jitter = rng.integers(-1, 2, size=3) * rng.integers(0, [max(1, p // 4) for p in size])
        centre = coords[rng.integers(len(coords))] + jitter
        return crop_patch(image, centre, size), crop_patch(label, centre, size)

    def _augmented(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if is_single_slice(image):  # 2D: augment in-plane (C x H x W), then restore the slice axis
            out = self.augment_2d({"image": image[..., 0], "label": label[..., 0]})
            out = {key: torch.as_tensor(out[key])[..., None] for key in ("image", "label")}
        else:
            out = self.augment({"image": image, "label": label})
        return torch.as_tensor(out["image"]).float(), torch.as_tensor(out["label"]).round().to(torch.int16)

    def _present(self, label: torch.Tensor) -> set[int]:
        """Classes with at least ``min_class_voxels`` voxels in a patch, so no support mask is (nearly) empty."""
        values, counts = torch.unique(label, return_counts=True)
        return {int(v) for v, n in zip(values.tolist(), counts.tolist()) if n >= self.pool.min_class_voxels}

    def _choose_classes(self, rng: np.random.Generator, anchor: int, candidates: set[int]) -> list[int]:
        others = sorted(candidates - {anchor})
        rng.shuffle(others)
        others = [value for value in others[: self.max_classes - 1] if rng.random() >= self.drop_prob]
        return [anchor, *others]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.start + index])
        augmentation_seed = int(rng.integers(2**31))
        self.augment.set_random_state(seed=augmentation_seed)
        self.augment_2d.set_random_state(seed=augmentation_seed)
        batch_rng = np.random.default_rng([self.seed, (self.start + index) // self.batch_size, 1])
        dataset = int(batch_rng.choice(len(self._weights), p=self._weights))
        holders = self._holders[dataset]
        anchor = int(rng.choice(sorted(holders)))
        few = len(holders[anchor]) <= self.k_shot  # only with self_support: subjects repeat as their own support
        chosen = rng.choice(holders[anchor], size=self.k_shot + 1, replace=few)
        query, supports = self.pool.subjects[chosen[0]], [self.pool.subjects[i] for i in chosen[1:]]

        support_patches = [self._augmented(*self._patch(rng, subject, anchor)) for subject in supports]
        query_image, query_label = self._augmented(*self._patch(rng, query, anchor))

        present = set.intersection(*(self._present(label) for _, label in support_patches))
        trainable = {v for v in present & query.classes if v != 0 and not self.pool.is_held_out(dataset, v)}
        values = self._choose_classes(rng, anchor, trainable)

        names = self.pool.class_names
        info = self.pool.datasets[dataset]
        class_ids = torch.full((self.max_classes,), -1, dtype=torch.long)
        class_ids[: len(values)] = torch.tensor([names.index(info.class_name(v)) for v in values])
        query_image = query_image + self.query_noise_std * torch.from_numpy(
            rng.standard_normal(query_image.shape, dtype=np.float32)
        )
        return {
            "support_image": torch.stack([image for image, _ in support_patches]),
            "support_mask": torch.stack(
                [binary_masks(label, values, self.max_classes) for _, label in support_patches]
            ),
            "query_image": query_image,
            "query_mask": binary_masks(query_label, values, self.max_classes),
            "class_valid": class_ids >= 0,
            "class_ids": class_ids,
            "subject_ids": torch.as_tensor(chosen, dtype=torch.long),  # query first, then the supports
        }


class OneShotValidationDataset(Dataset):
    """1-shot validation cases: one whole validation volume and, per class, a reference patch from a training subject.

    References are fixed by ``seed``, so every validation run sees the same cases.

    Items: ``query_image`` 1 x D x H x W, ``query_mask`` K x D x H x W (uint8), ``support_image`` K x 1 x P,
    ``support_mask`` K x 1 x P (uint8, each class with its own reference), ``class_ids`` K.

    Args:
        pool: validation subjects.
        reference_pool: training subjects to draw references from (same datasets, by name).
        patch_size: size of the reference patch, the training patch size.
        seed: seed of the reference draw.
    """

    def __init__(self, pool: DatasetPool, reference_pool: DatasetPool, patch_size: Sequence[int], seed: int = 0):
        self.pool = pool
        self.reference_pool = reference_pool
        self.patch_size = tuple(patch_size)
        self.seed = seed
        self._cases = []
        for index, subject in enumerate(pool.subjects):
            name = pool.datasets[subject.dataset].name
            values = [value for value in sorted(subject.classes) if reference_pool.holders(name, value)]
            if values:
                self._cases.append((index, name, values))
        if not self._cases:
            raise DatasetPoolError("No validation subject has a class that also appears in a training subject.")

    def __len__(self) -> int:
        return len(self._cases)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        subject_index, dataset_name, values = self._cases[index]
        subject = self.pool.subjects[subject_index]
        rng = np.random.default_rng([self.seed, index])
        images, masks = [], []
        for value in values:
            holders = self.reference_pool.holders(dataset_name, value)
            reference = holders[rng.integers(len(holders))]
            coords = reference.foreground[value]
            image, label = crop_around(reference, coords[rng.integers(len(coords))], self.patch_size)
            images.append(image)
            masks.append(binary_masks(label, [value], 1))
        info = self.pool.datasets[subject.dataset]
        names = self.pool.class_names
        image, label = subject.volumes()
        return {
            "query_image": image,
            "query_mask": binary_masks(label, values, len(values)),
            "support_image": torch.stack(images),
            "support_mask": torch.stack(masks),
            "class_ids": torch.tensor([names.index(info.class_name(v)) for v in values]),
        }
