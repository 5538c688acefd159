"""Sliding-window in-context inference that reuses task embeddings for every window and every query."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SlidingWindowInferer
from torch import nn

from ..data.patches import bounding_box_centre, crop_patch, patch_size_for
from .match import ReferenceMatch
from .mirroring import check_mirror_axes, mirrored
from .task_embeddings import ensemble
from .volume_calibration import ReferenceVolumeCalibration


class VolumeSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's sliding-window inferer whose windows have depth 1 on single-slice (2D) inputs, and whose windows can
    be segmented mirrored too (``mirror_axes``, see :mod:`scripts.segmentation.mirroring`).

    A 2D image (B x C x H x W x 1) would otherwise be zero-padded to the full window depth, which the network never
    saw in training, where 2D patches have depth 1.

    Args:
        mirror_axes: spatial axes (0, 1, 2 for D, H, W) whose mirrorings are averaged with every window; empty: none.
        args, kwargs: those of MONAI's ``SlidingWindowInferer``.
    """

    def __init__(self, *args, mirror_axes: Sequence[int] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mirror_axes = check_mirror_axes(mirror_axes)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        roi_size = self.roi_size
        self.roi_size = patch_size_for(inputs[0], roi_size)
        try:
            return super().__call__(inputs, mirrored(network, self.mirror_axes), *args, **kwargs)
        finally:
            self.roi_size = roi_size


class InContextInferer(Inferer):
    """Segment a query with task embeddings set once (``set_task``), as SAM's predictor caches its image embedding.

    The embeddings go through MONAI's sliding-window inferer as an extra argument, which reaches every window
    unchanged; the support set is never re-encoded. Without embeddings the network uses its memory bank.

    Args:
        roi_size: window size, the training patch size.
        sw_batch_size: windows per forward pass.
        overlap: window overlap.
        mode: blending of overlapping windows, ``"gaussian"`` or ``"constant"``.
        cpu_thresh: stitch the K-channel logits in CPU memory for volumes of more voxels than this (MONAI's
            ``SlidingWindowInferer`` option, which also falls back to CPU stitching when the GPU runs out of memory);
            None stitches on the input's device.
        stitch_dtype: dtype of the full-resolution K-channel stitching buffer, e.g. ``"float16"`` to halve it when a
            label map is all that is needed (MONAI stitches in the input's dtype, so the volume is cast to it and each
            window back to the network's dtype); None keeps the input's dtype.
        mirror_axes: spatial axes whose mirrorings are averaged with every window (``2 ** len(mirror_axes)`` network
            passes, see :mod:`scripts.segmentation.mirroring`); empty for one pass.
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        sw_batch_size: int = 2,
        overlap: float = 0.5,
        mode: str = "gaussian",
        cpu_thresh: int | None = None,
        stitch_dtype: str | torch.dtype | None = None,
        mirror_axes: Sequence[int] = (),
    ):
        super().__init__()
        self.window_settings = {
            "roi_size": tuple(roi_size),
            "sw_batch_size": sw_batch_size,
            "overlap": overlap,
            "mode": mode,
            "cpu_thresh": cpu_thresh,
            "stitch_dtype": stitch_dtype,
            "mirror_axes": list(mirror_axes),
        }
        if isinstance(stitch_dtype, str):
            name, stitch_dtype = stitch_dtype, getattr(torch, stitch_dtype, None)
            if not isinstance(stitch_dtype, torch.dtype) or not stitch_dtype.is_floating_point:
                raise ValueError(
                    f"stitch_dtype must name a floating-point torch dtype such as 'float16', got {name!r}."
                )
        self.stitch_dtype = stitch_dtype
        self.roi_size = tuple(roi_size)
        self.window = VolumeSlidingWindowInferer(
            roi_size,
            sw_batch_size=sw_batch_size,
            overlap=overlap,
            mode=mode,
            cpu_thresh=cpu_thresh,
            mirror_axes=mirror_axes,
        )
        self.task_embeddings: torch.Tensor | None = None
        self.calibration: ReferenceVolumeCalibration | None = None  # each class's threshold from its reference volume
        self.matcher: ReferenceMatch | None = None  # scores each query's objects against the references

    def set_task(self, embeddings: torch.Tensor | None) -> None:
        """Use ``embeddings`` (1 x K x T x C) for every following query; None means the memory bank."""
        self.task_embeddings = embeddings

    def use_task(
        self, embeddings: torch.Tensor, references: tuple[torch.Tensor, torch.Tensor] | None = None, top_k: int = 1
    ) -> None:
        """Take a strategy's result (see :func:`scripts.inference.strategies.apply_strategy`): its embeddings; the
        per-reference embeddings and ``top_k`` serve retrieval only."""
        self.set_task(embeddings)

    def __call__(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        """Return logits B x K x D x H x W for ``inputs`` (B x 1 x D x H x W)."""
        return self._checked(inputs, self._segment(inputs, network, self.task_embeddings))

    def _checked(self, inputs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The logits after :attr:`calibration` and then the match check of :attr:`matcher` (which may drop warned
        classes), where they are set: the match check scores the objects that will be written."""
        if self.calibration is not None:
            logits = self.calibration(inputs, logits)
        return logits if self.matcher is None else self.matcher(inputs, logits)

    def _segment(self, inputs: torch.Tensor, network: nn.Module, embeddings: torch.Tensor | None) -> torch.Tensor:
        window_inputs, predictor = self._stitching(inputs, network)
        return self.window(window_inputs, predictor, task_embeddings=embeddings)

    def _stitching(self, inputs: torch.Tensor, network: nn.Module) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
        """Inputs and predictor for MONAI's windows, which stitch in the inputs' dtype: with ``stitch_dtype``, the
        volume in that dtype and a predictor that gives the network each window back in ``inputs.dtype``."""
        if self.stitch_dtype is None or self.stitch_dtype == inputs.dtype:
            return inputs, network
        network_dtype, stitch_dtype = inputs.dtype, self.stitch_dtype

        def predict(window: torch.Tensor, **kwargs) -> torch.Tensor:
            return network(window.to(network_dtype), **kwargs).to(stitch_dtype)

        return inputs.to(stitch_dtype), predict


class RetrievalInferer(InContextInferer):
    """Object-level retrieval: each query is first segmented with the task embeddings (the references' mean), the
    objects found are encoded as the references were, and each class is segmented again with the mean of its
    ``top_k`` most similar references (:meth:`retrieve`).

    Args: as :class:`InContextInferer`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.references: tuple[torch.Tensor, torch.Tensor] | None = None
        self.top_k = 1

    def use_task(
        self, embeddings: torch.Tensor, references: tuple[torch.Tensor, torch.Tensor] | None = None, top_k: int = 1
    ) -> None:
        """First pass with ``embeddings``; then retrieve per query among ``references`` (R x K x T x C embeddings of
        each reference, R x K slots that hold one)."""
        self.references, self.top_k = references, top_k
        self.set_task(embeddings)

    def __call__(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        if self.references is None:
            raise RuntimeError("RetrievalInferer needs the references of a task (use_task) before segmenting a query.")
        if inputs.shape[0] != 1:
            raise ValueError(f"RetrievalInferer retrieves per query: give one query at a time, got {inputs.shape[0]}.")
        logits = self._segment(inputs, network, self.task_embeddings)
        if bool((self.references[1].sum(0) <= self.top_k).all()):
            return self._checked(inputs, logits)  # every class keeps all its references: the first pass is the answer
        found = logits[0] > 0  # K x D x H x W, the objects of the first pass
        if not found.flatten(1).any(-1).all():
            return self._checked(inputs, logits)  # a class was not found at all: the ensemble result for every class
        query_embeddings = network.encode_support(*self._object_patches(inputs[0], found))  # K x 1 x T x C
        chosen = self.retrieve(*self.references, query_embeddings.transpose(0, 1), self.top_k)
        return self._checked(inputs, self._segment(inputs, network, chosen))

    @staticmethod
    def retrieve(
        per_reference: torch.Tensor, present: torch.Tensor, query_embeddings: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        """Per class, the mean of the ``top_k`` references most similar (cosine) to the object found in the query.

        Args:
            per_reference: R x K x T x C reference embeddings.
            present: R x K, which references hold each class (see ``task_embeddings.encode_references``).
            query_embeddings: 1 x K x T x C embeddings of the objects first found in the query.
            top_k: references kept per class (fewer when a class has fewer references).
        """
        similarity = F.cosine_similarity(per_reference.flatten(2), query_embeddings.flatten(2), dim=-1)  # R x K
        similarity = similarity.masked_fill(~present, float("-inf"))
        best = similarity.topk(min(top_k, per_reference.shape[0]), dim=0).indices  # top_k x K
        chosen = torch.gather(per_reference, 0, best[..., None, None].expand(-1, -1, *per_reference.shape[2:]))
        return ensemble(chosen, torch.gather(present, 0, best))

    def _object_patches(self, image: torch.Tensor, found: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches of the query around each found object, as the references were encoded: K x 1 x 1 x P each."""
        images, masks = [], []
        for mask in found:
            centre = bounding_box_centre(mask.nonzero())
            images.append(crop_patch(image, centre, self.roi_size))
            masks.append(crop_patch(mask[None].float(), centre, self.roi_size))
        return torch.stack(images)[:, None], torch.stack(masks)[:, None]
