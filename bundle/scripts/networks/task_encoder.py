"""Task encoder: turns support features and a binary mask into the task embedding ``[T_f; T_c; P]`` of one class."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, FourierPositionEncoding, MLPBlock


def _linear_upsampling_matrix(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """Matrix ``A`` (size_in x size_out) with ``upsample(x)[o] = sum_i x[i] * A[i, o]`` for 1D linear interpolation.

    It is the 1D factor of trilinear ``F.interpolate(..., align_corners=False)``, which is separable per axis.
    """
    identity = torch.eye(size_in, device=device, dtype=torch.float32).unsqueeze(1)  # size_in x 1 x size_in
    return F.interpolate(identity, size=size_out, mode="linear", align_corners=False).squeeze(1)


def upsampling_adjoint(masks: torch.Tensor, low_size: list[int]) -> torch.Tensor:
    """Apply the adjoint of trilinear upsampling (``low_size`` -> mask size) to full-resolution masks.

    ``<upsample(F), M> == <F, upsampling_adjoint(M)>``, so pooling features as if they were upsampled to the input
    resolution never needs the full-resolution C-channel features (the paper's small-object fix, at 1/C the memory).

    Args:
        masks: N x K x D x H x W.
        low_size: bottleneck size ``(d, h, w)``.

    Returns:
        N x K x d x h x w weights.
    """
    a_d = _linear_upsampling_matrix(low_size[0], masks.shape[2], masks.device)
    a_h = _linear_upsampling_matrix(low_size[1], masks.shape[3], masks.device)
    a_w = _linear_upsampling_matrix(low_size[2], masks.shape[4], masks.device)
    weights = torch.einsum("nkDHW,dD->nkdHW", masks.float(), a_d)
    weights = torch.einsum("nkdHW,hH->nkdhW", weights, a_h)
    return torch.einsum("nkdhW,wW->nkdhw", weights, a_w)


def foreground_pooling(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean of ``features`` upsampled to the mask resolution, computed at feature resolution.

    Args:
        features: N x C x d x h x w bottleneck features.
        masks: N x K x D x H x W binary masks.

    Returns:
        N x K x C foreground tokens (zero for an empty mask).
    """
    weights = upsampling_adjoint(masks, list(features.shape[2:]))  # N x K x d x h x w
    pooled = torch.einsum("nkdhw,ncdhw->nkc", weights.to(features.dtype), features)
    area = masks.flatten(2).float().sum(-1, keepdim=True).clamp_min(1.0)  # N x K x 1
    return pooled / area.to(pooled.dtype)


class TaskEncoder(nn.Module):
    """Foreground token, ``m`` learnable context tokens and one foreground prototype per finer encoder stage.

    - ``T_f``: the mask-weighted mean of the bottleneck features as if upsampled to the mask's resolution (IRIS's
      foreground encoding, computed with :func:`foreground_pooling`).
    - ``T_c``: context tokens that cross-attend to support features fused with the class mask, then self-attend.
    - ``P_s``: the same mask-weighted mean of the features of every finer encoder stage ``s`` (an extension of IRIS's
      foreground encoding to every scale; at full resolution the image intensities are a feature too, since instance
      normalisation removes absolute intensity from the features), zero-padded to the token width. The mask decoder
      scores each query voxel by its similarity to them, a prototype match that works for new classes too.

    Args:
        encoder_channels: channels of every encoder stage, finest first; the last is the token width ``C``.
        num_query_tokens: number of context tokens ``m``.
        num_heads: attention heads.
        mlp_dim: hidden width of the feed-forward block.
    """

    def __init__(self, encoder_channels: Sequence[int], num_query_tokens: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        embed_dim = encoder_channels[-1]
        self.num_query_tokens = num_query_tokens
        self.num_prototypes = len(encoder_channels) - 1
        self.query_tokens = nn.Parameter(0.02 * torch.randn(num_query_tokens, embed_dim))
        self.mask_fusion = nn.Linear(embed_dim + 1, embed_dim)
        self.position = FourierPositionEncoding(embed_dim)
        self.cross_attn = Attention(embed_dim, num_heads)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.self_attn = Attention(embed_dim, num_heads)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = MLPBlock(embed_dim, mlp_dim)
        self.norm3 = nn.LayerNorm(embed_dim)

    @property
    def num_tokens(self) -> int:
        """Tokens per class: ``1 + m`` attention tokens and one prototype per finer stage."""
        return 1 + self.num_query_tokens + self.num_prototypes

    def forward(self, bottleneck: torch.Tensor, stages: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """Encode every class of every support image.

        Args:
            bottleneck: N x C x d x h x w support bottleneck features.
            stages: the S - 1 finer feature maps that prototypes are pooled from (see :meth:`IrisNet.stages`).
            masks: N x K x D x H x W binary support masks at input resolution.

        Returns:
            N x K x (1 + m + S - 1) x C task embeddings: ``T_f``, the ``m`` context tokens, then the prototypes of
            the finer stages (stage ``s`` in its first channels).
        """
        n, c = bottleneck.shape[:2]
        k = masks.shape[1]
        foreground = foreground_pooling(bottleneck, masks)  # N x K x C

        low_masks = F.adaptive_avg_pool3d(masks.to(bottleneck.dtype), bottleneck.shape[2:])  # N x K x d x h x w
        tokens = bottleneck.flatten(2).transpose(1, 2)  # N x L x C, L = d*h*w
        tokens = tokens.unsqueeze(1).expand(n, k, -1, -1)  # N x K x L x C
        fused = self.mask_fusion(torch.cat([tokens, low_masks.flatten(2).unsqueeze(-1)], dim=-1))
        fused = fused.flatten(0, 1)  # (N*K) x L x C
        keys = fused + self.position(list(bottleneck.shape[2:])).to(fused.dtype)

        queries = self.query_tokens.to(fused.dtype).expand(n * k, -1, -1)  # (N*K) x m x C
        queries = self.norm1(queries + self.cross_attn(queries, keys, fused))
        queries = self.norm2(queries + self.self_attn(queries, queries, queries))
        queries = self.norm3(queries + self.mlp(queries))
        context = queries.reshape(n, k, self.num_query_tokens, c)  # N x K x m x C
        parts = [foreground.unsqueeze(2).to(context.dtype), context]
        for stage in stages:  # N x K x 1 x C each, zero-padded from the stage's width
            prototype = F.pad(foreground_pooling(stage, masks), (0, c - stage.shape[1]))
            parts.append(prototype.unsqueeze(2).to(context.dtype))
        return torch.cat(parts, dim=2)
