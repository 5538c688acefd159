"""Two-way transformer between query image features and task tokens (segment-anything's design, in 3D)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, MLPBlock


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, tokens -> image, MLP, image -> tokens; each step ``x = norm(x + attn(...))``.

    Token self-attention runs within each class, so a class's tokens never read another class's tokens; the image
    features read all valid tokens, which is what lets every class come out of one decoder pass.

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
        self,
        tokens: torch.Tensor,
        image: torch.Tensor,
        token_pe: torch.Tensor,
        image_pe: torch.Tensor,
        token_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update tokens (B x K x T x C) and image features (B x L x C); ``token_mask`` is B x K bool or None."""
        b, k, t, c = tokens.shape
        # (1) self-attention among the T tokens of each class: B x K x T x C -> (B*K) x T x C
        flat = tokens.reshape(b * k, t, c)
        query = flat if self.skip_first_pe else flat + token_pe.reshape(b * k, t, c)
        attended = self.self_attn(query, query, flat)
        flat = attended if self.skip_first_pe else flat + attended
        flat = self.norm1(flat)

        # (2) tokens -> image: every token reads the query image
        tokens = flat.reshape(b, k * t, c)  # B x (K*T) x C
        pe = token_pe.reshape(b, k * t, c)
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + pe, image + image_pe, image))

        # (3) token MLP
        tokens = self.norm3(tokens + self.mlp(tokens))

        # (4) image -> tokens: the image reads the tokens of every valid class
        key_mask = None if token_mask is None else token_mask.repeat_interleave(t, dim=1)  # B x (K*T)
        image = self.norm4(image + self.cross_attn_image_to_token(image + image_pe, tokens + pe, tokens, key_mask))
        return tokens.reshape(b, k, t, c), image


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
        self,
        tokens: torch.Tensor,
        image: torch.Tensor,
        token_pe: torch.Tensor,
        image_pe: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the stack.

        Args:
            tokens: B x K x T x C task tokens.
            image: B x L x C flattened query bottleneck features.
            token_pe: B x K x T x C token positional (role) encodings.
            image_pe: L x C (or B x L x C) image positional encodings.
            token_mask: B x K bool, False for padded classes; None when every class is real.

        Returns:
            Updated tokens (B x K x T x C) and image features (B x L x C).
        """
        for layer in self.layers:
            tokens, image = layer(tokens, image, token_pe, image_pe, token_mask)
        b, k, t, c = tokens.shape
        flat = tokens.reshape(b, k * t, c)
        pe = token_pe.reshape(b, k * t, c)
        flat = self.norm_final(flat + self.final_attn_token_to_image(flat + pe, image + image_pe, image))
        return flat.reshape(b, k, t, c), image
