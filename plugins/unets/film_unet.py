"""Module 16's UNet: pre-activation residual blocks whose features are scaled by a
time-dependent FiLM vector, strided-conv down 28 → 14 → 7 and transposed-conv up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minild_plugins.unets.blocks import (
    Attention,
    ClassEmbedding,
    SinusoidalEmbedding,
    check_constructor_conditioning,
    check_inputs,
    crop_to,
    group_norm,
    pad_to_multiple,
)


class FiLMResidualBlock(nn.Module):
    """GroupNorm → SiLU → conv, h = h * time_mlp(emb) (FiLM scale), GroupNorm → SiLU → conv, + skip."""

    def __init__(self, in_channels: int, out_channels: int, time_embedding_dim: int, norm_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embedding_dim, out_channels),
            nn.SiLU(),
            nn.Linear(out_channels, out_channels),
        )
        self.norm2 = group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h * self.time_mlp(time_embedding)[:, :, None, None]  # [B, C] -> [B, C, 1, 1]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class FiLMUNet(nn.Module):
    """The Module-16 UNet (seeds 000 and 003) with the seed's GroupNorm count as ``norm_groups``.

    init conv → ResBlock(b → 2b) → conv 4/2/1 (H → H/2) → ResBlock(2b → 2b) → conv 4/2/1
    (H/2 → H/4) → middle ResBlock(2b) → transposed conv 4/2/1 → ResBlock(→ b) → transposed
    conv 4/2/1 → ResBlock(→ b) → GroupNorm → SiLU → conv 3×3. Each block gets the bare
    sinusoidal embedding and turns it into its own FiLM scale with a two-layer MLP.

    Two repairs to the seed, which cannot run as printed: its down convs take ``b`` channels
    where the block before them yields ``2b`` (here they take ``2b``), and it stores the
    encoder outputs for "skip connections" without using them (here they are concatenated
    into the decoder blocks at the same resolution). The seed's sizes are ``base_channels=64``,
    ``time_embedding_dim=128``, ``norm_groups=32``.

    Conditioning: ``num_classes`` adds a learned class vector to the sinusoidal embedding,
    so it reaches every block through the FiLM MLPs; ``cross_attention_dim`` puts
    cross-attention after the H/2 encoder block, the middle block and the H/2 decoder block;
    ``attention`` puts self-attention after the middle block. Inputs are zero-padded to sides
    divisible by 4 and the output cropped back.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        time_embedding_dim: int = 128,
        norm_groups: int = 32,
        attention: bool = False,
        attention_heads: int = 4,
        num_classes: int | None = None,
        cross_attention_dim: int | None = None,
        cross_attention_heads: int = 4,
    ):
        super().__init__()
        check_constructor_conditioning("film_unet", num_classes, cross_attention_dim)
        out_channels = in_channels if out_channels is None else out_channels
        self.num_classes = num_classes
        self.cross_attention_dim = cross_attention_dim
        b = base_channels

        def block(in_ch: int, out_ch: int) -> FiLMResidualBlock:
            return FiLMResidualBlock(in_ch, out_ch, time_embedding_dim, norm_groups)

        def attention_at(channels: int, self_attention: bool = False) -> Attention:
            return Attention(
                channels,
                self_attention=self_attention,
                cross_attention_dim=cross_attention_dim,
                attention_heads=attention_heads,
                cross_attention_heads=cross_attention_heads,
                norm_groups=norm_groups,
            )

        self.time_embedding = SinusoidalEmbedding(time_embedding_dim, freq_shift=0)
        self.class_embedding = ClassEmbedding(num_classes, time_embedding_dim) if num_classes is not None else None

        self.init_conv = nn.Conv2d(in_channels, b, 3, padding=1)
        self.down_res1 = block(b, 2 * b)
        self.down_conv1 = nn.Conv2d(2 * b, 2 * b, 4, stride=2, padding=1)
        self.down_res2 = block(2 * b, 2 * b)
        self.down_attention2 = attention_at(2 * b)
        self.down_conv2 = nn.Conv2d(2 * b, 2 * b, 4, stride=2, padding=1)

        self.middle_res = block(2 * b, 2 * b)
        self.middle_attention = attention_at(2 * b, self_attention=attention)

        self.up_conv2 = nn.ConvTranspose2d(2 * b, 2 * b, 4, stride=2, padding=1)
        self.up_res2 = block(2 * b + 2 * b, b)
        self.up_attention2 = attention_at(b)
        self.up_conv1 = nn.ConvTranspose2d(b, b, 4, stride=2, padding=1)
        self.up_res1 = block(b + 2 * b, b)

        self.final_norm = group_norm(b, norm_groups)
        self.final_conv = nn.Conv2d(b, out_channels, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = check_inputs(
            "film_unet",
            x,
            t,
            class_labels,
            context,
            num_classes=self.num_classes,
            cross_attention_dim=self.cross_attention_dim,
        )
        emb = self.time_embedding(t)  # [B, time_embedding_dim]
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels, x.shape[0])
        x, size = pad_to_multiple(x, 4)

        h = self.init_conv(x)  # [B, b, H, W]
        skip1 = self.down_res1(h, emb)  # [B, 2b, H, W]
        h = self.down_conv1(skip1)  # [B, 2b, H/2, W/2]
        skip2 = self.down_attention2(self.down_res2(h, emb), context)  # [B, 2b, H/2, W/2]
        h = self.down_conv2(skip2)  # [B, 2b, H/4, W/4]

        h = self.middle_attention(self.middle_res(h, emb), context)

        h = self.up_conv2(h)  # [B, 2b, H/2, W/2]
        h = self.up_attention2(self.up_res2(torch.cat([h, skip2], dim=1), emb), context)  # [B, b, H/2, W/2]
        h = self.up_conv1(h)  # [B, b, H, W]
        h = self.up_res1(torch.cat([h, skip1], dim=1), emb)

        h = self.final_conv(F.silu(self.final_norm(h)))
        return crop_to(h, size)
