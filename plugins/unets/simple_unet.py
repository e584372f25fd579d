"""Lab 2.6.1's SimpleUNet: GroupNorm residual blocks with an additive time embedding,
max-pool down, transposed-conv up, skips concatenated after matching sizes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minild_plugins.unets.blocks import (
    Attention,
    ClassEmbedding,
    PooledContextEmbedding,
    SinusoidalEmbedding,
    check_constructor_conditioning,
    check_inputs,
    group_norm,
)


class ResidualBlock(nn.Module):
    """conv → GroupNorm → SiLU, add the projected time embedding, conv → GroupNorm → SiLU, + skip."""

    def __init__(self, in_channels: int, out_channels: int, time_embedding_dim: int, norm_groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = group_norm(out_channels, norm_groups)
        self.time_proj = nn.Linear(time_embedding_dim, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = h + self.time_proj(time_embedding)[:, :, None, None]  # [B, C] -> [B, C, 1, 1]
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class SimpleUNet(nn.Module):
    """Lab 2.6.1's SimpleUNet (seed 001), generalised from 3 levels to ``channel_mults``.

    Encoder level i is a ResidualBlock to ``base_channels * channel_mults[i]`` channels at
    1/2^i of the input size, each followed by MaxPool2d(2); a bottleneck ResidualBlock;
    then per level, deepest first, ConvTranspose2d(2, stride 2), nearest-neighbour resize to
    the skip's size (7 → 3 → 6 must come back to 7), concatenation, ResidualBlock. The time
    embedding is the sinusoidal encoding through Linear(d, 4d) → SiLU → Linear(4d, d), added
    in every block. The seed's sizes are ``base_channels=64`` (default here 32, four times
    cheaper on a CPU), ``channel_mults=[1, 2, 4]``, ``time_embedding_dim=128``.

    Conditioning: ``num_classes`` adds a learned class vector to the time embedding;
    ``cross_attention_dim`` puts cross-attention after the deepest encoder level, the
    bottleneck and the deepest decoder level, and ``pooled_context`` also adds the context's
    mean over tokens (normalised, projected) to the time embedding, as Imagen does with its
    pooled text embedding; ``attention`` puts self-attention at the bottleneck. Inputs need
    sides of at least 2^len(channel_mults).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mults: list[int] = [1, 2, 4],  # noqa: B006 - plain data recorded in configs, never mutated
        time_embedding_dim: int = 128,
        norm_groups: int = 8,
        attention: bool = False,
        attention_heads: int = 4,
        num_classes: int | None = None,
        cross_attention_dim: int | None = None,
        cross_attention_heads: int = 4,
        pooled_context: bool = False,
    ):
        super().__init__()
        check_constructor_conditioning("simple_unet", num_classes, cross_attention_dim)
        if pooled_context and cross_attention_dim is None:
            raise ValueError("simple_unet: pooled_context needs a context; set cross_attention_dim as well")
        if not channel_mults:
            raise ValueError("simple_unet: channel_mults needs at least one level, e.g. [1, 2, 4]")
        out_channels = in_channels if out_channels is None else out_channels
        self.num_classes = num_classes
        self.cross_attention_dim = cross_attention_dim
        self.min_size = 2 ** len(channel_mults)

        def attention_at(channels: int, self_attention: bool = False) -> Attention:
            return Attention(
                channels,
                self_attention=self_attention,
                cross_attention_dim=cross_attention_dim,
                attention_heads=attention_heads,
                cross_attention_heads=cross_attention_heads,
                norm_groups=norm_groups,
            )

        self.time_embedding = SinusoidalEmbedding(time_embedding_dim, freq_shift=1)
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embedding_dim, 4 * time_embedding_dim),
            nn.SiLU(),
            nn.Linear(4 * time_embedding_dim, time_embedding_dim),
        )
        self.class_embedding = ClassEmbedding(num_classes, time_embedding_dim) if num_classes is not None else None
        self.context_embedding = (
            PooledContextEmbedding(cross_attention_dim, time_embedding_dim) if pooled_context else None
        )

        level_channels = [base_channels * mult for mult in channel_mults]
        self.encoder = nn.ModuleList()
        channels = in_channels
        for level_out in level_channels:
            self.encoder.append(ResidualBlock(channels, level_out, time_embedding_dim, norm_groups))
            channels = level_out
        self.pool = nn.MaxPool2d(2)
        self.encoder_attention = attention_at(channels)
        self.bottleneck = ResidualBlock(channels, channels, time_embedding_dim, norm_groups)
        self.bottleneck_attention = attention_at(channels, self_attention=attention)

        # Decoder level i (deepest first) maps [upsampled, skip_i] to the channels of level i - 1.
        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(len(level_channels))):
            level_out = level_channels[max(level - 1, 0)]
            self.upsamplers.append(nn.ConvTranspose2d(channels, channels, 2, stride=2))
            self.decoder.append(
                ResidualBlock(channels + level_channels[level], level_out, time_embedding_dim, norm_groups)
            )
            channels = level_out
        self.decoder_attention = attention_at(level_channels[max(len(level_channels) - 2, 0)])
        self.out_conv = nn.Conv2d(channels, out_channels, 1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = check_inputs(
            "simple_unet",
            x,
            t,
            class_labels,
            context,
            num_classes=self.num_classes,
            cross_attention_dim=self.cross_attention_dim,
        )
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"simple_unet with {len(self.encoder)} levels needs sides of at least {self.min_size}, "
                f"got {tuple(x.shape[-2:])}"
            )
        emb = self.time_mlp(self.time_embedding(t))  # [B, time_embedding_dim]
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels, x.shape[0])
        if self.context_embedding is not None:
            emb = emb + self.context_embedding(context)

        skips = []
        h = x
        for i, block in enumerate(self.encoder):
            h = block(h if i == 0 else self.pool(h), emb)
            if i == len(self.encoder) - 1:
                h = self.encoder_attention(h, context)
            skips.append(h)
        h = self.bottleneck(self.pool(h), emb)
        h = self.bottleneck_attention(h, context)

        for i, (upsample, block) in enumerate(zip(self.upsamplers, self.decoder)):
            skip = skips.pop()
            h = upsample(h)
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:])
            h = block(torch.cat([h, skip], dim=1), emb)
            if i == 0:
                h = self.decoder_attention(h, context)
        return self.out_conv(h)
