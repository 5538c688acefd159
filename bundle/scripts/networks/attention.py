"""Attention building blocks shared by the task encoder and the mask decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention with separate query/key/value projections, as in segment-anything.

    The softmax is computed in fp32 even under autocast, so fp16/bf16 training cannot overflow it.

    Args:
        embed_dim: token width ``C``.
        num_heads: number of heads; must divide ``embed_dim``.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # B x N x C -> B x heads x N x C/heads
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend from ``q`` (B x Nq x C) to ``k``/``v`` (B x Nk x C); returns B x Nq x C."""
        q, k, v = (
            self._split_heads(self.q_proj(q)),
            self._split_heads(self.k_proj(k)),
            self._split_heads(self.v_proj(v)),
        )
        q32, k32, v32 = q.float(), k.float(), v.float()
        if torch.jit.is_scripting():  # an exported TorchScript model runs without autocast
            out = F.scaled_dot_product_attention(q32, k32, v32)
        else:
            with torch.autocast(q.device.type, enabled=False):  # softmax in fp32 under AMP (tokens are few)
                out = F.scaled_dot_product_attention(q32, k32, v32)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)  # B x heads x Nq x C/heads -> B x Nq x C
        return self.out_proj(out)


class MLPBlock(nn.Module):
    """Two-layer feed-forward block used after attention."""

    def __init__(self, embed_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, embed_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FourierPositionEncoding(nn.Module):
    """Random Fourier features of normalised voxel coordinates (segment-anything's dense positional encoding, in 3D).

    The Gaussian frequency matrix is a buffer drawn from a fixed seed, so every process and every checkpoint agrees.

    Args:
        embed_dim: output width; must be even (sine and cosine halves).
        scale: standard deviation of the frequencies.
    """

    def __init__(self, embed_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        if embed_dim % 2 != 0:
            raise ValueError(f"Positional encoding width must be even, got embed_dim={embed_dim}.")
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("frequencies", scale * torch.randn(3, embed_dim // 2, generator=generator))

    def forward(self, spatial_size: list[int]) -> torch.Tensor:
        """Encode the voxel centres of a ``D x H x W`` grid.

        Returns:
            (D*H*W) x C encodings, in the flattening order of ``tensor.flatten(2)``.
        """
        device = self.frequencies.device
        axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in spatial_size]
        grid = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1).reshape(-1, 3)  # DHW x 3 in (0, 1)
        projected = 2 * math.pi * (2 * grid - 1) @ self.frequencies  # DHW x C/2
        return torch.cat([projected.sin(), projected.cos()], dim=-1)
