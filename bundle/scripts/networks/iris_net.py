"""IrisNet: in-context segmentation from a support set (or the memory bank) and a query volume."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import extra_state
from .encoder import ResidualEncoder
from .mask_decoder import MaskDecoder
from .memory import MemoryBank
from .task_encoder import TaskEncoder

PAPER_CHANNEL_MULTIPLIERS = (1, 2, 4, 8, 10)
COORDINATE_CHANNELS = 3  # one per spatial axis: scripts.data.transforms.AppendCoordinatesd


class IrisNet(nn.Module):
    """Composes an encoder shared by support and query, a task encoder, a mask decoder and a memory bank.

    Args:
        encoder: returns multi-scale features, finest first.
        task_encoder: support features + masks -> task embeddings.
        mask_decoder: query features + task embeddings -> logits.
        memory_bank: optional class memory used when no task embeddings are given.
        settings: how the network was built and trained and how it must be used (network hyper-parameters, patch size,
            spacing, datasets with their modality and classes; see :mod:`scripts.segmentation.model_io`). They are
            the module's extra state (a tensor, see :mod:`.extra_state`), so every state dict (``model.pt``, a
            training checkpoint's ``network``) carries them.
        adopt_saved_settings: let :meth:`load_state_dict` first rebuild the network to the size a state dict
            records, so that a network built before its weights are known (MONAI's ``ckpt_export --ckpt_file``)
            loads any model. Off for training, where the optimizer already holds the parameters.
    """

    def __init__(
        self,
        encoder: ResidualEncoder,
        task_encoder: TaskEncoder,
        mask_decoder: MaskDecoder,
        memory_bank: MemoryBank | None = None,
        settings: Mapping[str, Any] | None = None,
        adopt_saved_settings: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.task_encoder = task_encoder
        self.mask_decoder = mask_decoder
        self.memory_bank = memory_bank
        self.episode_embeddings: torch.Tensor | None = None  # of the last training episode (see forward)
        self.settings = dict(settings or {})
        self.adopt_saved_settings = adopt_saved_settings

    def get_extra_state(self) -> torch.Tensor:
        return extra_state.encode(self.settings)

    def set_extra_state(self, state: torch.Tensor | dict[str, Any]) -> None:
        self.settings = dict(extra_state.decode(state, {}))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; with ``adopt_saved_settings``, the parts are first rebuilt to the network
        size that ``state_dict`` records (when it records one that differs from this network's)."""
        if self.adopt_saved_settings:
            self._adopt(state_dict)
        return super().load_state_dict(state_dict, strict, assign)

    def _adopt(self, state_dict: Mapping[str, Any]) -> None:
        saved = extra_state.decode(state_dict.get("_extra_state"), {}).get("network")
        if not saved or saved == self.settings.get("network"):
            return
        classes = extra_state.decode(state_dict.get("memory_bank._extra_state"), {}).get("class_names", [])
        built = build_iris_net(**saved, memory_classes=classes)
        device = next(self.parameters()).device
        for part in ("encoder", "task_encoder", "mask_decoder", "memory_bank"):
            setattr(self, part, None if getattr(built, part) is None else getattr(built, part).to(device))
        self.settings = {**self.settings, "network": saved}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # models saved before bundle 0.5.0 record no settings: load them strictly all the same, with none
        state_dict.setdefault(prefix + "_extra_state", {})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    @property
    def token_shape(self) -> tuple[int, int]:
        """``(T, C)``: the shape of one class's task embedding (``T = m + 1 +`` one prototype per finer stage)."""
        return self.task_encoder.num_tokens, self.task_encoder.query_tokens.shape[-1]

    def encode_support(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Task embeddings of the K classes shown in S support images, averaged over the shots.

        Args:
            images: B x S x in_channels x D x H x W support images.
            masks: B x S x K x D x H x W binary masks (class k of shot s).

        Returns:
            B x K x T x C task embeddings (see :class:`TaskEncoder`).
        """
        if images.dim() != 6 or masks.dim() != 6 or images.shape[:2] != masks.shape[:2]:
            raise ValueError(
                "encode_support expects images B x S x C x D x H x W and masks B x S x K x D x H x W, "
                f"got {tuple(images.shape)} and {tuple(masks.shape)}."
            )
        b, s = images.shape[:2]
        images = images.flatten(0, 1)
        features = self.encoder(images)  # every stage, (B*S) x C_s x ...
        embeddings = self.task_encoder(features[-1], self.stages(images, features), masks.flatten(0, 1))
        return embeddings.reshape(b, s, *embeddings.shape[1:]).mean(dim=1)  # K-shot context ensemble

    def encode_classes(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Task embeddings of K classes that each have their own S references (patches centred on the class).

        Args:
            images: B x K x S x in_channels x D x H x W reference patches.
            masks: B x K x S x 1 x D x H x W binary masks of each patch's class.

        Returns:
            B x K x T x C task embeddings, each class averaged over its references.
        """
        b, k = images.shape[:2]
        embeddings = self.encode_support(images.flatten(0, 1), masks.flatten(0, 1))  # (B*K) x 1 x T x C
        return embeddings.reshape(b, k, *embeddings.shape[2:])

    def encode_episodes(self, images: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Task embeddings of training episodes whose class slots may be padding.

        Args:
            images: B x K x S x in_channels x D x H x W reference patches, each class with its own.
            masks: B x K x S x 1 x D x H x W binary masks of each patch's class.
            valid: B x K, the slots that hold a class; padded slots are not encoded and stay zero.

        Returns:
            B x K x T x C task embeddings.
        """
        encoded = self.encode_classes(images[valid][None], masks[valid][None])[0]  # V x T x C
        embeddings = encoded.new_zeros(*valid.shape, *encoded.shape[1:])
        embeddings[valid] = encoded
        return embeddings

    def forward(
        self,
        query: torch.Tensor,
        task_embeddings: torch.Tensor | None = None,
        support_image: torch.Tensor | None = None,
        support_mask: torch.Tensor | None = None,
        class_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Segment ``query`` (B x in_channels x D x H x W).

        Args:
            task_embeddings: B x K x T x C, or 1 x K x T x C shared by the batch (sliding windows);
                None uses every class of the memory bank (a plain ``net(x)``). Each class is decoded independently
                of the others (see :class:`MaskDecoder`).
            support_image, support_mask, class_valid: a training episode's references instead of
                ``task_embeddings`` (see :meth:`encode_episodes`). The whole episode then goes through one forward,
                so that a DistributedDataParallel wrapper sees every use of the parameters; its B x K x T x C task
                embeddings are kept, detached, as :attr:`episode_embeddings` for the memory bank's update.

        Returns:
            B x K x D x H x W logits (sigmoid per class; classes may overlap).
        """
        if not torch.jit.is_scripting() and support_image is not None:  # training; not in the TorchScript export
            if task_embeddings is not None or support_mask is None or class_valid is None:
                raise ValueError("Give either task_embeddings or support_image, support_mask and class_valid.")
            embeddings = self.encode_episodes(support_image, support_mask, class_valid)
            self.episode_embeddings = embeddings.detach()
            return self._decode(query, embeddings)
        if task_embeddings is None:
            if self.memory_bank is None:
                raise RuntimeError("This IrisNet has no memory bank: pass task_embeddings from encode_support.")
            task_embeddings = self.memory_bank().unsqueeze(0)
        return self._decode(query, task_embeddings)

    def _decode(self, query: torch.Tensor, task_embeddings: torch.Tensor) -> torch.Tensor:
        if task_embeddings.shape[0] == 1:
            task_embeddings = task_embeddings.expand(query.shape[0], -1, -1, -1)
        features = self.encoder(query)
        return self.mask_decoder(features, self.stages(query, features), task_embeddings)

    @staticmethod
    def stages(image: torch.Tensor, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The feature maps that class prototypes are pooled from and compared with: every stage but the bottleneck,
        the full-resolution one with the image intensities as extra channels (instance normalisation removes absolute
        intensity, which tells many structures apart, from the features)."""
        return [torch.cat([image.to(features[0].dtype), features[0]], dim=1)] + features[1:-1]


def build_iris_net(
    in_channels: int = 1,
    coordinate_channels: bool = False,
    base_channels: int = 32,
    num_query_tokens: int = 10,
    num_heads: int = 8,
    decoder_depth: int = 2,
    blocks_per_stage: int = 1,
    channel_multipliers: Sequence[int] = PAPER_CHANNEL_MULTIPLIERS,
    use_memory_bank: bool = True,
    memory_momentum: float = 0.9,
    memory_classes: Sequence[str] = (),
    settings: Mapping[str, Any] | None = None,
    adopt_saved_settings: bool = False,
) -> IrisNet:
    """Build the paper-scale network (the defaults) or a smaller preset.

    Encoder stage ``i`` has ``base_channels * channel_multipliers[i]`` channels and all but the first halve the
    resolution; tokens are as wide as the bottleneck. Fewer stages keep a useful bottleneck for small patches
    (the CPU demo uses four stages on 32³ patches, a 4³ bottleneck). ``coordinate_channels``: the images carry
    three more channels after their ``in_channels``, each voxel's place in its volume (see
    :class:`scripts.data.transforms.AppendCoordinatesd`). ``memory_classes`` reserves memory-bank rows
    for the classes of the weights to be loaded, so the query-only forward has their channels before loading.
    The network records its hyper-parameters, with ``settings`` (what training knows: patch size, spacing, datasets),
    in every state dict it saves (see :mod:`scripts.segmentation.model_io`); ``adopt_saved_settings``: see
    :class:`IrisNet`.
    """
    if base_channels < 1 or num_query_tokens < 1:
        raise ValueError(f"base_channels and num_query_tokens must be >= 1, got {base_channels}, {num_query_tokens}.")
    channels = [base_channels * factor for factor in channel_multipliers]
    embed_dim = channels[-1]
    mlp_dim = 4 * embed_dim
    task_encoder = TaskEncoder(channels, num_query_tokens, num_heads, mlp_dim)
    input_channels = in_channels + (COORDINATE_CHANNELS if coordinate_channels else 0)
    prototype_widths = [input_channels + channels[0], *channels[1:-1]]  # see IrisNet.stages
    memory = None
    if use_memory_bank:
        memory = MemoryBank(task_encoder.num_tokens, embed_dim, memory_momentum, memory_classes)
    network = {
        "in_channels": in_channels,
        "coordinate_channels": bool(coordinate_channels),
        "base_channels": base_channels,
        "num_query_tokens": num_query_tokens,
        "num_heads": num_heads,
        "decoder_depth": decoder_depth,
        "blocks_per_stage": blocks_per_stage,
        "channel_multipliers": [int(factor) for factor in channel_multipliers],
        "use_memory_bank": use_memory_bank,
        "memory_momentum": memory_momentum,
    }
    return IrisNet(
        encoder=ResidualEncoder(input_channels, channels, blocks_per_stage),
        task_encoder=task_encoder,
        mask_decoder=MaskDecoder(channels, num_query_tokens + 1, num_heads, decoder_depth, mlp_dim, prototype_widths),
        memory_bank=memory,
        settings={**dict(settings or {}), "network": network},
        adopt_saved_settings=adopt_saved_settings,
    )
