"""Two-way transformer between query image features and one class's task tokens (segment-anything's design, in 3D).

The mask decoder runs it once per class (classes folded into the batch), so a class's tokens and the image features
they update never meet another class: a class's result does not depend on which other classes are decoded with it.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, MLPBlock


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, tokens -> image, MLP, image -> tokens; each step ``x = norm(x + attn(...))``.

    Args:
        embed_dim: token width ``C``.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLP.
        skip_first_pe: do not add the token positional encoding to the first self-attention (first layer).
    """

    def __init__(self, embed_dim: int, num_heads: int, mlp_dim: int, skip_first_pe: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(embed_dim, num_heads)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn_token_to_image = Attention(embed_dim, num_heads)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = MLPBlock(embed_dim, mlp_dim)
        self.norm3 = nn.LayerNorm(embed_dim)
        self.cross_attn_image_to_token = Attention(embed_dim, num_heads)
        self.norm4 = nn.LayerNorm(embed_dim)
        self.skip_first_pe = skip_first_pe

    def forward(
        self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update tokens (N x T x C) and image features (N x L x C), N = batch x classes."""
        # (1) self-attention among the T tokens of the class
        query = tokens if self.skip_first_pe else tokens + token_pe
        attended = self.self_attn(query, query, tokens)
        tokens = self.norm1(attended if self.skip_first_pe else tokens + attended)
        # (2) tokens -> image: every token reads the query image
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + token_pe, image + image_pe, image))
        # (3) token MLP
        tokens = self.norm3(tokens + self.mlp(tokens))
        # (4) image -> tokens: the image reads the class's tokens
        image = self.norm4(image + self.cross_attn_image_to_token(image + image_pe, tokens + token_pe, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """A stack of two-way blocks followed by a final token -> image attention."""

    def __init__(self, depth: int, embed_dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [TwoWayAttentionBlock(embed_dim, num_heads, mlp_dim, skip_first_pe=i == 0) for i in range(depth)]
        )
        self.final_attn_token_to_image = Attention(embed_dim, num_heads)
        self.norm_final = nn.LayerNorm(embed_dim)

    def forward(
        self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the stack.

        Args:
            tokens: N x T x C task tokens of one class each.
            image: N x L x C flattened query bottleneck features.
            token_pe: T x C (or N x T x C) token positional (role) encodings.
            image_pe: L x C (or N x L x C) image positional encodings.

        Returns:
            Updated tokens (N x T x C) and image features (N x L x C).
        """
        for layer in self.layers:
            tokens, image = layer(tokens, image, token_pe, image_pe)
        tokens = self.norm_final(tokens + self.final_attn_token_to_image(tokens + token_pe, image + image_pe, image))
        return tokens, image
