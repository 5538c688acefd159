"""Mask decoder: two-way attention at the bottleneck, a U-Net decoder with skips, and per-class dot products."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetResBlock
from torch import nn

from .attention import FourierPositionEncoding, MLPBlock
from .encoder import ACT, NORM
from .transformer import TwoWayTransformer


class UpBlock(nn.Module):
    """Project to the skip's width, upsample to its size, concatenate, residual block.

    The 1x1x1 projection runs at the coarse resolution before the (trilinear, so odd sizes and depth 1 work)
    upsampling, as nnU-Net's decoder reduces channels before concatenating: the block's first convolution then sees
    ``2 * skip_channels`` inputs instead of ``in_channels + skip_channels``, which makes the full-resolution block, the
    costliest layer of a training step, a quarter cheaper (see docs/benchmarks.md). The projection is a per-voxel
    ``nn.Linear`` rather than a 1x1x1 convolution: cuDNN returned that convolution's weight gradient with strides
    that differ from the weight's, which DDP warns about and copies every step.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = nn.Linear(in_channels, skip_channels)
        self.block = UnetResBlock(
            3, 2 * skip_channels, out_channels, kernel_size=3, stride=1, norm_name=NORM, act_name=ACT
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.project(x.movedim(1, -1)).movedim(-1, 1)
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))


class MaskDecoder(nn.Module):
    """Decode all K classes of a query in one pass.

    Args:
        encoder_channels: channels of every encoder stage, finest first; the last is the token width ``C``.
        num_tokens: tokens per class ``m + 1``.
        num_heads: attention heads.
        depth: two-way transformer blocks.
        mlp_dim: hidden width of the token MLPs.
    """

    def __init__(
        self, encoder_channels: Sequence[int], num_tokens: int, num_heads: int, depth: int, mlp_dim: int
    ) -> None:
        super().__init__()
        embed_dim = encoder_channels[-1]
        self.position = FourierPositionEncoding(embed_dim)
        self.token_role = nn.Parameter(0.02 * torch.randn(num_tokens, embed_dim))  # foreground vs context tokens
        self.transformer = TwoWayTransformer(depth, embed_dim, num_heads, mlp_dim)
        widths = list(encoder_channels)
        self.up_blocks = nn.ModuleList(
            [UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(len(widths) - 1))]
        )
        self.hypernetwork = MLPBlock(embed_dim, embed_dim)
        self.to_pixel_width = nn.Linear(embed_dim, widths[0])

    def pixel_embeddings(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """U-Net decoding of bottleneck-sized ``x`` through the skips of ``features`` up to the finest resolution."""
        for i, up in enumerate(self.up_blocks):
            x = up(x, features[-2 - i])
        return x

    def forward(
        self, features: list[torch.Tensor], task_embeddings: torch.Tensor, class_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Segment the query.

        Args:
            features: query encoder features, finest first; the bottleneck is B x C x d x h x w.
            task_embeddings: B x K x (m+1) x C.
            class_valid: B x K bool, False for padded classes (their logits are still returned, but no real class
                reads their tokens); None when every class is real.

        Returns:
            B x K x D x H x W logits at the resolution of the finest features.
        """
        bottleneck = features[-1]
        b, c = bottleneck.shape[:2]
        low_size = list(bottleneck.shape[2:])
        image = bottleneck.flatten(2).transpose(1, 2)  # B x C x d x h x w -> B x L x C
        image_pe = self.position(low_size).to(image.dtype)  # L x C
        tokens = task_embeddings.to(image.dtype)
        token_pe = self.token_role.to(image.dtype).expand_as(tokens)  # B x K x T x C
        tokens, image = self.transformer(tokens, image, token_pe, image_pe, class_valid)

        x = self.pixel_embeddings(image.transpose(1, 2).reshape(bottleneck.shape), features)  # B x c0 x D x H x W
        class_tokens = tokens[:, :, 0]  # B x K x C, the updated foreground token of each class
        weights = self.to_pixel_width(class_tokens + self.hypernetwork(class_tokens))  # B x K x c0
        return torch.einsum("bke,bedhw->bkdhw", weights, x)
