"""``tiny_eps``: a two-level convolutional eps-model small enough to write in one screen.

conv in → residual block at H → average-pool → residual block at H/2 → upsample → residual
block on [up, skip] → conv out; the timestep (and optional class) embedding is added in every
residual block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` ``[B]`` → ``[B, dim]`` (Transformer / DDPM positions)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=dtype) / half)  # [dim/2]
    angles = t.to(dtype)[:, None] * frequencies[None]  # [B, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    """GroupNorm → SiLU → conv, add the embedding, GroupNorm → SiLU → conv, + skip."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(4, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding_proj = nn.Linear(embedding_dim, out_channels)
        self.norm2 = nn.GroupNorm(4, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.embedding_proj(embedding)[:, :, None, None]  # [B, C] -> [B, C, 1, 1]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class TinyEpsModel(nn.Module):
    """``model(x, t, class_labels=None, context=None) -> eps`` on even-sized images.

    ``num_classes`` adds a learned class vector to the time embedding; row ``num_classes`` of
    that table is the null class that classifier-free guidance uses for the unconditional pass.
    It has no cross-attention, so a ``context`` is refused.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: int = 32,
        embedding_dim: int = 64,
        num_classes: int | None = None,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        if channels % 4 or embedding_dim % 2:
            raise ValueError(f"tiny_eps: channels must be a multiple of 4 and embedding_dim even, got {channels}, {embedding_dim}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.time_mlp = nn.Sequential(nn.Linear(embedding_dim, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = ResidualBlock(channels, channels, embedding_dim)
        self.middle = ResidualBlock(channels, 2 * channels, embedding_dim)
        self.up = ResidualBlock(3 * channels, channels, embedding_dim)
        self.conv_out = nn.Conv2d(channels, in_channels if out_channels is None else out_channels, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if context is not None:
            raise ValueError("tiny_eps has no cross-attention: pass context=None (it cannot be text-conditioned)")
        if x.ndim != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"tiny_eps: x must be [B, C, H, W] with even H and W, got {tuple(x.shape)}")
        embedding = self.time_mlp(timestep_embedding(t, self.embedding_dim, x.dtype))  # [B, D]
        if self.class_embedding is not None:
            if class_labels is None:  # unconditional: the null class
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device)
            embedding = embedding + self.class_embedding(class_labels)
        elif class_labels is not None:
            raise ValueError("tiny_eps was built without classes: set num_classes to use class_labels")

        h = self.conv_in(x)  # [B, c, H, W]
        skip = self.down(h, embedding)  # [B, c, H, W]
        h = self.middle(F.avg_pool2d(skip, 2), embedding)  # [B, 2c, H/2, W/2]
        h = F.interpolate(h, scale_factor=2, mode="nearest")  # [B, 2c, H, W]
        h = self.up(torch.cat([h, skip], dim=1), embedding)  # [B, c, H, W]
        return self.conv_out(h)
