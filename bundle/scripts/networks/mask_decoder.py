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
    costliest layer of a training step, cheaper (measured in docs/benchmarks.md). The projection is a per-voxel
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
    """Decode K classes of a query, each one independently of the others.

    A class's logits are the sum of two terms:

    - **token term** (IRIS's decoder): the class's tokens run the two-way transformer with their own copy of the query
      bottleneck features (classes folded into the batch), and the updated foreground token, through a hypernetwork,
      weighs the pixel embeddings of a U-Net decoder over the query (as in segment-anything and MaskFormer);
    - **prototype term**: at every finer encoder stage, a learned scale times the cosine similarity of the query's
      features with the class's foreground prototype of that stage (see :class:`TaskEncoder`), both through a learned
      linear map of the stage, upsampled to full resolution, plus a learned bias.

    The pixel embeddings do not depend on the task and are computed once. No step mixes classes, so a class's logits
    are the same whether it is decoded alone or with 14 others; training with 4 classes per episode therefore carries
    over to inference with any number.

    Args:
        encoder_channels: channels of every encoder stage, finest first; the last is the token width ``C``.
        num_tokens: attention tokens per class ``m + 1`` (the prototypes follow them in the task embedding).
        num_heads: attention heads.
        depth: two-way transformer blocks.
        mlp_dim: hidden width of the token MLPs.
        prototype_widths: channels of the finer stages that prototypes are pooled from (see :meth:`IrisNet.stages`).
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        num_tokens: int,
        num_heads: int,
        depth: int,
        mlp_dim: int,
        prototype_widths: Sequence[int],
    ) -> None:
        super().__init__()
        embed_dim = encoder_channels[-1]
        self.num_tokens = num_tokens
        self.position = FourierPositionEncoding(embed_dim)
        self.token_role = nn.Parameter(0.02 * torch.randn(num_tokens, embed_dim))  # foreground vs context tokens
        self.transformer = TwoWayTransformer(depth, embed_dim, num_heads, mlp_dim)
        widths = list(encoder_channels)
        self.up_blocks = nn.ModuleList(
            [UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(len(widths) - 1))]
        )
        self.hypernetwork = MLPBlock(embed_dim, embed_dim)
        self.to_pixel_width = nn.Linear(embed_dim, widths[0])
        # a linear map per stage: after LeakyReLU every feature is nearly non-negative, so raw cosine similarities are
        # all high; the map lets each stage learn a signed space where different structures point apart
        self.prototype_spaces = nn.ModuleList([nn.Linear(width, width) for width in prototype_widths])
        self.prototype_scale = nn.Parameter(torch.full((len(prototype_widths),), 5.0))  # cosine similarity -> logits
        self.prototype_bias = nn.Parameter(torch.tensor(-2.0))

    def pixel_embeddings(self, features: list[torch.Tensor]) -> torch.Tensor:
        """U-Net decoding of the bottleneck through the skips of ``features`` up to the finest resolution."""
        x = features[-1]
        for i, up in enumerate(self.up_blocks):
            x = up(x, features[-2 - i])
        return x

    def prototype_logits(self, stages: list[torch.Tensor], prototypes: torch.Tensor) -> torch.Tensor:
        """B x K x D x H x W prototype term from the query's finer stages and the class prototypes (B x K x S-1 x C,
        stage ``s`` in its first channels)."""
        size = stages[0].shape[2:]
        logits = self.prototype_bias
        for s, space in enumerate(self.prototype_spaces):
            stage = stages[s]
            prototype = space(prototypes[:, :, s, : stage.shape[1]].to(stage.dtype))  # B x K x C_s
            voxels = space(stage.movedim(1, -1)).movedim(-1, 1)  # B x C_s x D_s x H_s x W_s
            similarity = torch.einsum("bkc,bcdhw->bkdhw", F.normalize(prototype, dim=-1), F.normalize(voxels, dim=1))
            if similarity.shape[2:] != size:
                similarity = F.interpolate(similarity, size=size, mode="trilinear", align_corners=False)
            logits = logits + self.prototype_scale[s] * similarity
        return logits

    def forward(
        self, features: list[torch.Tensor], stages: list[torch.Tensor], task_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """Segment the query.

        Args:
            features: query encoder features, finest first; the bottleneck is B x C x d x h x w.
            stages: the query's finer feature maps that prototypes are compared with (see :meth:`IrisNet.stages`).
            task_embeddings: B x K x T x C, the ``m + 1`` attention tokens followed by the stage prototypes.

        Returns:
            B x K x D x H x W logits at the resolution of the finest features.
        """
        bottleneck = features[-1]
        b, k, _, c = task_embeddings.shape
        t = self.num_tokens
        image = bottleneck.flatten(2).transpose(1, 2)  # B x C x d x h x w -> B x L x C
        image = image.repeat_interleave(k, dim=0)  # (B*K) x L x C, one copy per class
        image_pe = self.position(list(bottleneck.shape[2:])).to(image.dtype)  # L x C
        tokens = task_embeddings[:, :, :t].to(image.dtype).reshape(b * k, t, c)  # (B*K) x (m+1) x C
        tokens, _ = self.transformer(tokens, image, self.token_role.to(image.dtype), image_pe)

        pixels = self.pixel_embeddings(features)  # B x c0 x D x H x W, shared by every class
        class_tokens = tokens[:, 0].reshape(b, k, c)  # the updated foreground token of each class
        weights = self.to_pixel_width(class_tokens + self.hypernetwork(class_tokens))  # B x K x c0
        token_logits = torch.einsum("bke,bedhw->bkdhw", weights, pixels)
        return token_logits + self.prototype_logits(stages, task_embeddings[:, :, t:])
