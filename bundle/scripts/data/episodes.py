"""Episodes over a dataset pool: training episodes (support + query patches) and 1-shot validation cases.

Every item is a pure function of ``(seed, index)``, so episodes are reproducible whatever the number of DataLoader
workers or ranks, and a resumed run continues the exact sequence by skipping the episodes already used (``start``).

2D images are single-slice volumes (H x W x 1): their patches are ``(P_D, P_H, 1)`` for a configured patch size
``(P_D, P_H, P_W)`` and they are augmented in-plane, with the same network and configs as 3D data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from torch.utils.data import Dataset

from .derived_classes import DerivedClass
from .patches import binary_masks, bounding_box_centre, crop_around, patch_shape
from .pool import DatasetPool, DatasetPoolError, Subject
from .synthetic_classes import SYNTHETIC_LABELS, SyntheticClass
from .transforms import episode_augmentation, is_single_slice

QUERY_CROPS = ("anchor", "other_class", "random")
HELD_OUT_VOXELS = ("background", "unlabelled")
ABSENT_CLASS_CHOICES = ("random", "similar_intensity")
Paste = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
INTENSITY_SUBJECTS = 8  # subjects per class whose foreground voxels give its typical intensity
SYNTHETIC_PRESENCE = 2 / 3  # probability that a synthetic class is in the query patch
SYNTHETIC_DISTRACTOR = 1 / 2  # probability that the query patch also holds a synthetic structure of another look


class EpisodeDataset(Dataset):
    """Random training episodes, ``length`` of them, drawn from a pool.

    One episode: pick a dataset (by ``dataset_weights``, one draw per batch so that a batch never mixes datasets, nor
    2D and 3D patches), an *anchor* class, a query subject that has it and ``k_shot`` *different* support subjects that
    have it. The query patch is cropped around the anchor, around another structure of the query, or anywhere
    (``query_crop``). The episode asks for the anchor and up to ``max_classes - 1`` other classes of the support
    subjects, first those the query patch holds (distractors to tell apart), then absent ones (empty targets); each
    extra class is dropped with ``random_class_drop_prob``. So "segment the object in the middle" or "segment every
    object" cannot lower the loss; reading the reference can. Every requested class gets its own support patch,
    centred on it, in each support subject, as references are cropped at inference. Support and query patches are
    augmented independently and the query is perturbed with Gaussian noise. Held-out classes are never requested; their
    voxels in the query are background of every requested class, or ``query_unlabelled`` (see ``held_out_voxels``).
    Absent classes are drawn at random or, as hard negatives, those closest in intensity to a structure of the query
    patch first (``absent_class_choice``): an intensity threshold then cannot tell the answer, the reference's texture
    and shape can.

    Items (``K = max_classes``, ``S = k_shot``, ``P = patch size``):
        ``support_image`` K x S x 1 x P, ``support_mask`` K x S x 1 x P (uint8, class k in its own patches),
        ``query_image`` 1 x P, ``query_mask`` K x P (uint8), ``query_unlabelled`` 1 x P (bool), ``class_valid`` K
        (bool), ``class_ids`` K (long, index into ``pool.class_names``, -1 for padding, whose patches are zero, and
        for a synthetic class, which is valid),
        ``subject_ids`` S + 1 (indices into ``pool.subjects``, query first).

    Args:
        data: the training subjects (a :class:`DatasetPool`; ``train#dataset#data`` in the bundle's configs).
        length: number of episodes (iterations x batch size).
        patch_size: patch size ``(D, H, W)``.
        k_shot: support subjects per episode.
        max_classes: classes per episode, ``K``.
        random_class_drop_prob: probability of dropping each extra class.
        query_noise_std: standard deviation of the Gaussian noise added to the query.
        dataset_weights: sampling weight per dataset; None samples proportionally to dataset size.
        seed: base seed of every episode.
        augmentation_kwargs: options of :func:`scripts.data.transforms.episode_augmentation`.
        self_support: let a class held by at most ``k_shot`` subjects train with a subject as its own support
            (another crop, augmented independently). For fine-tuning on the few volumes an annotator has labelled.
        episodes_per_iteration: episodes of one training iteration, over all ranks (the batch size times the number
            of ranks): each such run of consecutive episodes comes from one dataset (a ``DistributedSampler`` without
            shuffling gives each rank a stride of it), and the curriculum counts iterations in them.
        query_crop: relative weights of the query crops: ``anchor`` (around the anchor class, jittered by up to a
            quarter patch), ``other_class`` (around another structure of the query subject) and ``random`` (anywhere
            in the volume, as a sliding window sees it). None weighs them equally.
        curriculum_iterations: iterations over which episodes go from easy to as hard as the options above make
            them (see :meth:`difficulty`); 0 turns the curriculum off.
        held_out_voxels: what the query's voxels of held-out classes are to the requested classes: ``"background"``
            (they are not any of them, as unlabelled structures are in real label maps) or ``"unlabelled"`` (masked
            out of the loss: ``query_unlabelled`` marks them).
        absent_class_choice: which absent classes an episode requests when it has room for some: ``"random"`` ones or
            ``"similar_intensity"`` ones first, ranked by how close their typical intensity (mean over the foreground
            of up to ``INTENSITY_SUBJECTS`` subjects) is to that of a trainable structure in the query patch.
        synthetic_class_prob: probability that an episode requests, in its last class slot, a synthetic class drawn
            for it alone (see :mod:`scripts.data.synthetic_classes`): pasted into every reference patch of its slot,
            into the query with probability ``SYNTHETIC_PRESENCE`` (else an empty target), and with a synthetic
            distractor of another look in the query with probability ``SYNTHETIC_DISTRACTOR``. 3D patches only.
        derived_class_prob: probability that an episode requests instead, in its last class slot, a class derived from
            two neighbouring trainable classes that every subject of the episode holds (see
            :mod:`scripts.data.derived_classes`): a new parcel of real anatomy, for pools whose structures differ by
            position more than by look. 3D patches only.
    """

    def __init__(
        self,
        data: DatasetPool,
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
        episodes_per_iteration: int = 1,
        query_crop: Mapping[str, float] | None = None,
        curriculum_iterations: int = 0,
        held_out_voxels: str = "unlabelled",
        absent_class_choice: str = "random",
        synthetic_class_prob: float = 0.0,
        derived_class_prob: float = 0.0,
    ) -> None:
        if held_out_voxels not in HELD_OUT_VOXELS:
            raise ValueError(
                f"train#dataset#held_out_voxels must be one of {list(HELD_OUT_VOXELS)}, got {held_out_voxels!r}."
            )
        if absent_class_choice not in ABSENT_CLASS_CHOICES:
            raise ValueError(
                f"train#dataset#absent_class_choice must be one of {list(ABSENT_CLASS_CHOICES)}, "
                f"got {absent_class_choice!r}."
            )
        if k_shot < 1 or max_classes < 1 or length < 1 or episodes_per_iteration < 1:
            raise ValueError(
                f"k_shot, train#dataset#max_classes, episodes_per_iteration and the episode count (total_iterations x "
                f"episodes_per_iteration) "
                f"must be >= 1, got {k_shot}, {max_classes}, {episodes_per_iteration}, {length}."
            )
        self.pool = data
        self.length = length
        self.patch_size = tuple(patch_size)
        self.k_shot = k_shot
        self.max_classes = max_classes
        self.drop_prob = random_class_drop_prob
        self.query_noise_std = query_noise_std
        self.seed = seed
        self.self_support = self_support
        self.start = 0  # episodes already consumed by a resumed run
        self.episodes_per_iteration = episodes_per_iteration
        self.query_crop = self._crop_weights(query_crop)
        if min(synthetic_class_prob, derived_class_prob) < 0 or synthetic_class_prob + derived_class_prob > 1:
            raise ValueError(
                "train#dataset#synthetic_class_prob and train#dataset#derived_class_prob must be >= 0 and add up to at "
                f"most 1, got {synthetic_class_prob} and {derived_class_prob}."
            )
        self.synthetic_class_prob = synthetic_class_prob
        self.derived_class_prob = derived_class_prob
        if curriculum_iterations < 0:
            raise ValueError(f"train#dataset#curriculum_iterations must be >= 0, got {curriculum_iterations}.")
        self.curriculum_iterations = curriculum_iterations
        self.held_out_voxels = held_out_voxels
        self.augment = episode_augmentation(self.patch_size, **(augmentation_kwargs or {}))
        self.augment_2d = episode_augmentation(self.patch_size[:2], **(augmentation_kwargs or {}))
        self._holders = self._class_holders()
        self._weights = self._dataset_weights(dataset_weights)
        means = data.mean_class_voxels() if curriculum_iterations else {}  # the curriculum's "large structures"
        self._class_sizes = [
            {value: means[info.class_name(value)] for value in holders} if means else {}
            for info, holders in zip(data.datasets, self._holders)
        ]
        self._intensities = self._class_intensities() if absent_class_choice == "similar_intensity" else None

    @staticmethod
    def _crop_weights(weights: Mapping[str, float] | None) -> np.ndarray:
        weights = dict.fromkeys(QUERY_CROPS, 1.0) if weights is None else dict(weights)
        unknown = sorted(set(weights) - set(QUERY_CROPS))
        values = np.array([float(weights.get(name, 0.0)) for name in QUERY_CROPS])
        if unknown or (values < 0).any() or values.sum() <= 0:
            raise ValueError(
                f"train#dataset#query_crop must give non-negative weights to {list(QUERY_CROPS)} (not all zero), "
                f"got {weights}."
            )
        return values / values.sum()

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
                "(--self_support True lets a subject support itself)."
            )
        return usable

    def _class_intensities(self) -> list[dict[int, float]]:
        """Per dataset: trainable class value -> mean intensity (first channel) over its sampled foreground voxels in
        up to ``INTENSITY_SUBJECTS`` of its subjects. Computed once; the images are normalised per dataset, so the
        values of one dataset compare."""
        intensities: list[dict[int, float]] = []
        for holders in self._holders:
            means = {}
            for value, subjects in holders.items():
                samples = []
                for index in subjects[:INTENSITY_SUBJECTS]:
                    subject = self.pool.subjects[index]
                    coords = torch.from_numpy(subject.foreground[value]).long()
                    samples.append(subject.image[0][coords[:, 0], coords[:, 1], coords[:, 2]].float().mean().item())
                means[value] = float(np.mean(samples))
            intensities.append(means)
        return intensities

    def _dataset_weights(self, weights: Sequence[float] | None) -> np.ndarray:
        sizes = np.array([sum(1 for s in self.pool.subjects if s.dataset == d) for d in range(len(self.pool.datasets))])
        if weights is None:
            weights = sizes
        weights = np.asarray(weights, dtype=float)
        if weights.shape != sizes.shape or (weights < 0).any():
            raise ValueError(
                f"train#dataset#dataset_weights must be {len(sizes)} non-negative numbers, got {weights.tolist()}."
            )
        weights = np.where([bool(h) for h in self._holders], weights, 0.0)
        if weights.sum() <= 0:
            raise ValueError("train#dataset#dataset_weights give zero weight to every dataset with trainable classes.")
        return weights / weights.sum()

    def __len__(self) -> int:
        return self.length - self.start

    def difficulty(self, episode: int) -> float:
        """How hard episode ``episode`` (its index in the whole run) is, from 0 to 1, rising linearly over the first
        ``curriculum_iterations`` iterations; always 1 without a curriculum.

        At difficulty ``d`` the anchor class is drawn with weight ``mean volume ** (2 * (1 - d))`` (large structures
        first), the episode requests at most ``round(d * (max_classes - 1))`` classes besides the anchor, absent
        classes (empty targets) with probability ``d``, and the off-target query crops keep the share ``d`` of their
        weight (the rest goes to crops around the anchor). A pure function of the index, so a resumed run continues
        the same sequence.
        """
        if self.curriculum_iterations == 0:
            return 1.0
        return min(1.0, episode / (self.curriculum_iterations * self.episodes_per_iteration))

    def _anchor(self, rng: np.random.Generator, dataset: int, difficulty: float) -> int:
        classes = sorted(self._holders[dataset])
        if difficulty >= 1.0:
            return int(rng.choice(classes))
        sizes = np.array([self._class_sizes[dataset][value] for value in classes])
        weights = (sizes / sizes.max()) ** (2.0 * (1.0 - difficulty))
        return int(rng.choice(classes, p=weights / weights.sum()))

    def _centre(self, rng: np.random.Generator, subject: Subject, value: int) -> np.ndarray:
        """A random foreground voxel of ``value``, jittered by up to a quarter patch."""
        coords = subject.foreground[value]
        size = patch_shape(subject.is_single_slice, self.patch_size)
        jitter = rng.integers(-1, 2, size=3) * rng.integers(0, [max(1, p // 4) for p in size])
        return coords[rng.integers(len(coords))] + jitter

    def _query_centre(
        self, rng: np.random.Generator, subject: Subject, anchor: int, difficulty: float = 1.0
    ) -> np.ndarray:
        """Where the query patch goes: see ``query_crop`` and :meth:`difficulty`."""
        weights = self.query_crop
        if difficulty < 1.0:  # off-target crops keep the share `difficulty` of their weight
            weights = weights * np.array([1.0, difficulty, difficulty])
            weights[0] += 1.0 - weights.sum()
        crop = QUERY_CROPS[rng.choice(len(QUERY_CROPS), p=weights)]
        others = sorted(subject.classes - {anchor})
        if crop == "other_class" and others:
            return self._centre(rng, subject, others[rng.integers(len(others))])
        if crop == "random":
            shape = np.array(subject.shape)
            half = np.array(patch_shape(subject.is_single_slice, self.patch_size)) // 2
            low, high = np.minimum(half, shape // 2), np.maximum(shape - half, shape // 2 + 1)
            return rng.integers(low, high)
        return self._centre(rng, subject, anchor)

    def _crop(
        self, subject: Subject, centre: Sequence[int], paste: Paste | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and label patches around ``centre``, with synthetic structures pasted in (``paste``), augmented."""
        volume, label = crop_around(subject, centre, self.patch_size)
        patch = {"image": volume[: self.pool.in_channels], "label": label}
        if self.pool.coordinate_channels:  # the voxels' places: moved with the image, never pasted over or rescaled
            patch["coordinates"] = volume[self.pool.in_channels :]
        if paste is not None:
            patch["image"], patch["label"] = paste(patch["image"], label)
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: the patches need no metadata, and MetaTensors triple the cost
        try:
            if is_single_slice(volume):  # 2D: augment in-plane (C x H x W), then restore the slice axis
                out = self.augment_2d({key: value[..., 0] for key, value in patch.items()})
                out = {key: torch.as_tensor(value)[..., None] for key, value in out.items()}
            else:
                out = self.augment(patch)
        finally:
            set_track_meta(tracking)
        image = torch.cat([torch.as_tensor(out[key]).float() for key in ("image", "coordinates") if key in out])
        return image, torch.as_tensor(out["label"]).round().to(torch.int16)

    def _present(self, label: torch.Tensor) -> set[int]:
        """Classes with at least ``min_class_voxels`` voxels in a patch, so no support mask is (nearly) empty."""
        values, counts = torch.unique(label, return_counts=True)
        return {int(v) for v, n in zip(values.tolist(), counts.tolist()) if n >= self.pool.min_class_voxels}

    def _choose_classes(
        self,
        rng: np.random.Generator,
        anchor: int,
        candidates: Sequence[int],
        in_query: set[int],
        dataset: int,
        difficulty: float = 1.0,
    ) -> list[int]:
        """The anchor, then up to ``max_classes - 1`` others: first classes the query patch holds (distractors that
        must be told apart), then absent ones (empty targets, ordered by ``absent_class_choice``); each extra class
        dropped with ``drop_prob``. Easier episodes (see :meth:`difficulty`) request fewer classes and fewer absent
        ones."""
        present = [value for value in candidates if value in in_query]
        absent = [value for value in candidates if value not in in_query]
        rng.shuffle(present)
        rng.shuffle(absent)
        if self._intensities is not None:  # hard negatives first; the shuffle above breaks ties at random
            means = self._intensities[dataset]
            structures = [means[value] for value in in_query if value in means]
            if structures:
                absent.sort(key=lambda value: min(abs(means[value] - mean) for mean in structures))
        extra = self.max_classes - 1
        if difficulty < 1.0:
            extra = int(round(difficulty * extra))
            absent = absent if rng.random() < difficulty else []
        others = [value for value in (present + absent)[:extra] if rng.random() >= self.drop_prob]
        return [anchor, *others]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.start + index])
        augmentation_seed = int(rng.integers(2**31))
        self.augment.set_random_state(seed=augmentation_seed)
        self.augment_2d.set_random_state(seed=augmentation_seed)
        batch_rng = np.random.default_rng([self.seed, (self.start + index) // self.episodes_per_iteration, 1])
        dataset = int(batch_rng.choice(len(self._weights), p=self._weights))
        holders = self._holders[dataset]
        difficulty = self.difficulty(self.start + index)
        anchor = self._anchor(rng, dataset, difficulty)
        few = len(holders[anchor]) <= self.k_shot  # only with self_support: subjects repeat as their own support
        chosen = rng.choice(holders[anchor], size=self.k_shot + 1, replace=few)
        query, supports = self.pool.subjects[chosen[0]], [self.pool.subjects[i] for i in chosen[1:]]
        # synthetic and derived classes draw from their own streams, so the rest of the episode is the same without
        synthetic_rng = np.random.default_rng([self.seed, self.start + index, 2])
        synthetic: list[SyntheticClass] = []
        slot = self.synthetic_class_prob + self.derived_class_prob
        draw = synthetic_rng.random() if slot > 0 and not query.is_single_slice else 1.0
        with_synthetic = draw < self.synthetic_class_prob
        derived_rng = np.random.default_rng([self.seed, self.start + index, 3])
        derived = None
        if draw < slot and not with_synthetic:
            derived = self._derived_class(derived_rng, dataset, anchor, [query, *supports])

        def paste_into_query(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            synthetic.extend(SyntheticClass.draw(synthetic_rng, image, label) for _ in SYNTHETIC_LABELS)
            for structure, value, prob in zip(synthetic, SYNTHETIC_LABELS, (SYNTHETIC_PRESENCE, SYNTHETIC_DISTRACTOR)):
                if synthetic_rng.random() < prob:
                    image, label = structure.paste(synthetic_rng, image, label, None, value)
            return image, label

        centre = self._query_centre(rng, query, anchor, difficulty)
        paste = paste_into_query if with_synthetic else self._relabelling(query, derived, centre) if derived else None
        query_image, query_label = self._crop(query, centre, paste)
        shared = set.intersection(*(subject.classes for subject in supports)) - {anchor}
        shared -= {derived.base, derived.other} if derived else set()  # their voxels may now be the derived class
        candidates = sorted(v for v in shared if not self.pool.is_held_out(dataset, v))
        values = self._choose_classes(rng, anchor, candidates, self._present(query_label), dataset, difficulty)
        # every class gets a patch centred on it in every support subject, as inference crops references
        references = [[self._crop(subject, self._centre(rng, subject, v)) for subject in supports] for v in values]
        if with_synthetic or derived:
            values, references = values[: self.max_classes - 1], references[: self.max_classes - 1]
        real_classes = len(values)
        if with_synthetic:
            values.append(SYNTHETIC_LABELS[0])
            references.append([self._synthetic_reference(synthetic_rng, subject, synthetic[0]) for subject in supports])
        if derived:
            values.append(SYNTHETIC_LABELS[0])
            references.append([self._derived_reference(derived_rng, derived, subject) for subject in supports])

        names = self.pool.class_names
        info = self.pool.datasets[dataset]
        class_ids = torch.full((self.max_classes,), -1, dtype=torch.long)
        class_ids[:real_classes] = torch.tensor([names.index(info.class_name(v)) for v in values[:real_classes]])
        class_valid = torch.arange(self.max_classes) < len(values)
        unlabelled = [
            v for v in info.labels if self.held_out_voxels == "unlabelled" and self.pool.is_held_out(dataset, v)
        ]
        query_unlabelled = torch.isin(query_label, torch.tensor(unlabelled, dtype=query_label.dtype))
        channels = self.pool.in_channels  # noise on the image, not on its coordinate channels
        query_image[:channels] += self.query_noise_std * torch.from_numpy(
            rng.standard_normal((channels, *query_image.shape[1:]), dtype=np.float32)
        )
        padding = [(torch.zeros_like(image), torch.zeros_like(label)) for image, label in references[0]]
        references += [padding] * (self.max_classes - len(values))
        return {
            "support_image": torch.stack([torch.stack([image for image, _ in shots]) for shots in references]),
            "support_mask": torch.stack(
                [
                    torch.stack([binary_masks(label, [value], 1) for _, label in shots])
                    for value, shots in zip([*values, *[-1] * (self.max_classes - len(values))], references)
                ]
            ),
            "query_image": query_image,
            "query_mask": binary_masks(query_label, values, self.max_classes),
            "query_unlabelled": query_unlabelled,
            "class_valid": class_valid,
            "class_ids": class_ids,
            "subject_ids": torch.as_tensor(chosen, dtype=torch.long),  # query first, then the supports
        }

    def _derived_class(
        self, rng: np.random.Generator, dataset: int, anchor: int, subjects: Sequence[Subject]
    ) -> DerivedClass | None:
        """A derived class of two trainable classes (not the anchor) that every subject of the episode holds; None when
        there are fewer than two."""
        shared = set.intersection(*(subject.classes for subject in subjects)) - {anchor}
        candidates = sorted(v for v in shared if not self.pool.is_held_out(dataset, v))
        return DerivedClass.draw(rng, candidates, subjects) if len(candidates) >= 2 else None

    def _relabelling(self, subject: Subject, derived: DerivedClass, centre: Sequence[int]) -> Paste:
        """The paste step of a crop around ``centre`` that labels the derived class's voxels in it."""
        start = [int(c) - n // 2 for c, n in zip(centre, patch_shape(subject.is_single_slice, self.patch_size))]

        def relabel(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return image, derived.relabel(subject, label, start, SYNTHETIC_LABELS[0])

        return relabel

    def _derived_reference(
        self, rng: np.random.Generator, derived: DerivedClass, subject: Subject
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A reference patch of a derived class: centred (jittered by up to an eighth of the patch) on one of its
        voxels in ``subject``, the class labelled."""
        size = np.array(self.patch_size)
        centre = derived.reference_voxel(rng, subject) + rng.integers(-(size // 8), size // 8 + 1)
        return self._crop(subject, centre, self._relabelling(subject, derived, centre))

    def _synthetic_reference(
        self, rng: np.random.Generator, subject: Subject, structure: SyntheticClass
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A reference patch of a synthetic class: a crop around a random structure of ``subject`` with the class
        pasted near its centre (jittered by up to an eighth of the patch), as a real reference is centred on its class.
        """
        around = sorted(subject.classes)
        centre = self._centre(rng, subject, around[rng.integers(len(around))])
        size = np.array(self.patch_size)
        jitter = rng.integers(-(size // 8), size // 8 + 1)

        def paste(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return structure.paste(rng, image, label, size // 2 + jitter, SYNTHETIC_LABELS[0])

        return self._crop(subject, centre, paste)


class OneShotValidationDataset(Dataset):
    """1-shot validation cases: one whole validation volume and, per class, a reference patch from a training subject.

    Every class of the dataset that has a training subject is requested, including classes the volume does not hold
    (``class_present`` False), so that false positives on absent classes are measured too. Each reference is a patch
    centred on its class's bounding box in a training subject, as inference crops references; they are fixed by
    ``seed``, so every validation run sees the same cases. With ``controls``, each case also carries the Dice of the
    trivial rules with the same references (computed once, NaN for absent classes).

    Items: ``query_image`` 1 x D x H x W, ``query_mask`` K x D x H x W (uint8), ``support_image`` K x 1 x 1 x P,
    ``support_mask`` K x 1 x 1 x P (uint8, each class with its own reference, as in training episodes),
    ``class_ids`` K, ``class_present`` K (bool), ``control_dice`` K x 2 (intensity rule, position rule).

    Args:
        data: the validation subjects (a :class:`DatasetPool`; ``validate#dataset#data`` in the bundle's configs).
        reference_pool: training subjects to draw references from (same datasets, by name).
        patch_size: size of the reference patch, the training patch size.
        seed: seed of the reference draw.
        controls: scores the trivial rules, ``(query_image, query_label, references, values) -> K x 2``
            (:func:`scripts.segmentation.controls.control_dice`, passed in by the configs, as data sits below the
            layer that scores); None leaves ``control_dice`` out.
    """

    def __init__(
        self,
        data: DatasetPool,
        reference_pool: DatasetPool,
        patch_size: Sequence[int],
        seed: int = 0,
        controls: Callable[..., np.ndarray] | None = None,
    ):
        self.pool = data
        self.reference_pool = reference_pool
        self.patch_size = tuple(patch_size)
        self.seed = seed
        self.controls = controls
        self._cases = []
        for index, subject in enumerate(data.subjects):
            info = data.datasets[subject.dataset]
            values = [value for value in sorted(info.labels) if reference_pool.holders(info.name, value)]
            if set(values) & subject.classes:
                self._cases.append((index, info.name, values))
        if not self._cases:
            raise DatasetPoolError("No validation subject has a class that also appears in a training subject.")
        self._control_dice: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._cases)

    def _references(self, index: int) -> list[Subject]:
        """The reference subject of each class of case ``index``, drawn with the case's own seed."""
        _, dataset_name, values = self._cases[index]
        rng = np.random.default_rng([self.seed, index])
        references = []
        for value in values:
            holders = self.reference_pool.holders(dataset_name, value)
            references.append(holders[rng.integers(len(holders))])
        return references

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        subject_index, _, values = self._cases[index]
        subject = self.pool.subjects[subject_index]
        references = self._references(index)
        images, masks = [], []
        for value, reference in zip(values, references):
            image, label = crop_around(reference, bounding_box_centre(reference.foreground[value]), self.patch_size)
            images.append(image)
            masks.append(binary_masks(label, [value], 1))
        info = self.pool.datasets[subject.dataset]
        names = self.pool.class_names
        image, label = subject.volumes()
        present = torch.tensor([value in subject.classes for value in values])
        item = {
            "query_image": image,
            "query_mask": binary_masks(label, values, len(values)),
            "support_image": torch.stack(images)[:, None],  # one shot per class
            "support_mask": torch.stack(masks)[:, None],
            "class_ids": torch.tensor([names.index(info.class_name(v)) for v in values]),
            "class_present": present,
        }
        if self.controls is not None:
            if index not in self._control_dice:
                references = [tuple(volume[0].numpy() for volume in reference.volumes()) for reference in references]
                scores = self.controls(image[0].numpy(), label[0].numpy(), references, values)
                self._control_dice[index] = torch.as_tensor(scores, dtype=torch.float32)
            item["control_dice"] = self._control_dice[index]
        return item
