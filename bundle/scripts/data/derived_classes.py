"""Derived classes: new structures made for one episode from two neighbouring real structures of real anatomy.

Pasted synthetic classes (:mod:`.synthetic_classes`) teach a model to find a structure by its look. Real anatomy
often has nothing but position to tell a structure from its neighbours (brain parcels are all grey matter): a model
trained only on a handful of such classes learns each as a detector and, given the reference of a new one, marks the
familiar parcel it resembles. A derived class is a new parcel drawn on real anatomy that no dataset labels: the half
of a structure A that faces its neighbour B, or A and B together. It looks like what the model knows, lies where the
reference shows it, and only the reference says where it ends, as for a held-out structure. The halves are cut by
the plane through A's centre facing B's centre, computed in each subject, so the class corresponds across subjects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .pool import Subject

KINDS = ("half", "union")


def centroid(subject: Subject, value: int) -> np.ndarray:
    """Centre (voxel coordinates) of class ``value`` in ``subject``, from its foreground sample."""
    return subject.foreground[value].mean(0)


@dataclass(frozen=True)
class DerivedClass:
    """The half of class ``base`` facing class ``other`` (``kind`` ``"half"``), or both (``"union"``)."""

    base: int
    other: int
    kind: str

    @classmethod
    def draw(cls, rng: np.random.Generator, candidates: Sequence[int], subjects: Sequence[Subject]) -> DerivedClass:
        """A random base class among ``candidates`` (classes every one of ``subjects`` holds, at least two), its
        nearest other candidate (by centre, in the first subject) and a random kind."""
        base = int(candidates[rng.integers(len(candidates))])
        others = [value for value in candidates if value != base]
        distances = [np.linalg.norm(centroid(subjects[0], v) - centroid(subjects[0], base)) for v in others]
        return cls(base, int(others[int(np.argmin(distances))]), KINDS[rng.integers(len(KINDS))])

    def contains(self, subject: Subject, label: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
        """The class's voxels (bool, D x H x W) in a label patch (1 x D x H x W) of ``subject`` that begins at volume
        voxel ``start``."""
        if self.kind == "union":
            return (label[0] == self.base) | (label[0] == self.other)
        centre, facing = centroid(subject, self.base), centroid(subject, self.other) - centroid(subject, self.base)
        grids = np.meshgrid(*[np.arange(n) + s - c for n, s, c in zip(label.shape[1:], start, centre)], indexing="ij")
        side = sum(axis * direction for axis, direction in zip(grids, facing)) > 0
        return (label[0] == self.base) & torch.from_numpy(side)

    def relabel(self, subject: Subject, label: torch.Tensor, start: Sequence[int], value: int) -> torch.Tensor:
        """``label`` with the class's voxels set to ``value`` (what was there, A or B, is no longer labelled so)."""
        label = label.clone()
        label[0][self.contains(subject, label, start)] = value
        return label

    def reference_voxel(self, rng: np.random.Generator, subject: Subject) -> np.ndarray:
        """A voxel of the class in ``subject`` (from the foreground samples), where a reference patch is centred."""
        samples = subject.foreground[self.base]
        if self.kind == "union":
            samples = np.concatenate([samples, subject.foreground[self.other]])
        else:
            facing = centroid(subject, self.other) - centroid(subject, self.base)
            inside = samples[((samples - centroid(subject, self.base)) @ facing) > 0]
            samples = inside if len(inside) else samples
        return samples[rng.integers(len(samples))]
