"""IrisNet: in-context segmentation from a support set (or the memory bank) and a query volume."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..memory import MemoryBank
from .encoder import ResidualEncoder
from .mask_decoder import MaskDecoder
from .task_encoder import TaskEncoder

PAPER_CHANNEL_MULTIPLIERS = (1, 2, 4, 8, 10)


class IrisNet(nn.Module):
    """Composes an encoder shared by support and query, a task encoder, a mask decoder and a memory bank.

    Args:
        encoder: returns multi-scale features, finest first.
        task_encoder: support features + masks -> task embeddings.
        mask_decoder: query features + task embeddings -> logits.
        memory_bank: optional class memory used when no task embeddings are given.
    """

    def __init__(
        self,
        encoder: ResidualEncoder,
        task_encoder: TaskEncoder,
        mask_decoder: MaskDecoder,
        memory_bank: MemoryBank | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.task_encoder = task_encoder
        self.mask_decoder = mask_decoder
        self.memory_bank = memory_bank

    @property
    def token_shape(self) -> tuple[int, int]:
        """``(m+1, C)``: the shape of one class's task embedding."""
        return self.task_encoder.num_query_tokens + 1, self.task_encoder.query_tokens.shape[-1]

    def encode_support(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Task embeddings of the K classes shown in S support images, averaged over the shots.

        Args:
            images: B x S x in_channels x D x H x W support images.
            masks: B x S x K x D x H x W binary masks (class k of shot s).

        Returns:
            B x K x (m+1) x C task embeddings.
        """
        if images.dim() != 6 or masks.dim() != 6 or images.shape[:2] != masks.shape[:2]:
            raise ValueError(
                "encode_support expects images B x S x C x D x H x W and masks B x S x K x D x H x W, "
                f"got {tuple(images.shape)} and {tuple(masks.shape)}."
            )
        b, s = images.shape[:2]
        features = self.encoder(images.flatten(0, 1))[-1]  # (B*S) x C x d x h x w
        embeddings = self.task_encoder(features, masks.flatten(0, 1))  # (B*S) x K x T x C
        return embeddings.reshape(b, s, *embeddings.shape[1:]).mean(dim=1)  # K-shot context ensemble

    def forward(
        self,
        query: torch.Tensor,
        task_embeddings: torch.Tensor | None = None,
        class_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Segment ``query`` (B x in_channels x D x H x W).

        Args:
            task_embeddings: B x K x (m+1) x C, or 1 x K x (m+1) x C shared by the batch (sliding windows);
                None uses every class of the memory bank (a plain ``net(x)``).
            class_valid: B x K bool, False for padded classes of a training episode.

        Returns:
            B x K x D x H x W logits (sigmoid per class; classes may overlap).
        """
        if task_embeddings is None:
            if self.memory_bank is None:
                raise RuntimeError("This IrisNet has no memory bank: pass task_embeddings from encode_support.")
            task_embeddings = self.memory_bank().unsqueeze(0)
        if task_embeddings.shape[0] == 1:
            task_embeddings = task_embeddings.expand(query.shape[0], -1, -1, -1)
        features = self.encoder(query)
        return self.mask_decoder(features, task_embeddings, class_valid)


def build_iris_net(
    in_channels: int = 1,
    base_channels: int = 32,
    num_query_tokens: int = 10,
    num_heads: int = 8,
    decoder_depth: int = 2,
    blocks_per_stage: int = 1,
    channel_multipliers: Sequence[int] = PAPER_CHANNEL_MULTIPLIERS,
    use_memory_bank: bool = True,
    memory_bank_size: int = 64,
    memory_momentum: float = 0.9,
    memory_classes: Sequence[str] = (),
) -> IrisNet:
    """Build the paper-scale network (the defaults) or a smaller preset.

    Encoder stage ``i`` has ``base_channels * channel_multipliers[i]`` channels and all but the first halve the
    resolution; tokens are as wide as the bottleneck. Fewer stages keep a useful bottleneck for small patches
    (the CPU demo uses four stages on 32³ patches, a 4³ bottleneck). ``memory_classes`` reserves memory-bank rows
    for the classes of the weights to be loaded, so the query-only forward has their channels before loading.
    """
    if base_channels < 1 or num_query_tokens < 1:
        raise ValueError(f"base_channels and num_query_tokens must be >= 1, got {base_channels}, {num_query_tokens}.")
    channels = [base_channels * factor for factor in channel_multipliers]
    embed_dim = channels[-1]
    mlp_dim = 4 * embed_dim
    memory = None
    if use_memory_bank:
        memory = MemoryBank(num_query_tokens + 1, embed_dim, memory_momentum, memory_bank_size, memory_classes)
    return IrisNet(
        encoder=ResidualEncoder(in_channels, channels, blocks_per_stage),
        task_encoder=TaskEncoder(embed_dim, num_query_tokens, num_heads, mlp_dim),
        mask_decoder=MaskDecoder(channels, num_query_tokens + 1, num_heads, decoder_depth, mlp_dim),
        memory_bank=memory,
    )
