"""doc 32's "Simple U-Net": BatchNorm/ReLU Blocks that end in a strided conv (down) or a
transposed conv (up), with a sinusoidal + Linear + ReLU time embedding."""

from __future__ import annotations

import torch
from torch import nn

from minild_plugins.unets.blocks import (
    Attention,
    ClassEmbedding,
    SinusoidalEmbedding,
    check_constructor_conditioning,
    check_inputs,
    crop_to,
    pad_to_multiple,
)


class Block(nn.Module):
    """conv → ReLU → BatchNorm, + ReLU(Linear(time)), conv → ReLU → BatchNorm, then resample.

    Down blocks end in Conv2d(4, stride 2, padding 1) (halves H and W), up blocks in
    ConvTranspose2d(4, stride 2, padding 1) (doubles them).
    """

    def __init__(self, in_channels: int, out_channels: int, time_embedding_dim: int, *, up: bool):
        super().__init__()
        self.time_mlp = nn.Linear(time_embedding_dim, out_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bnorm1 = nn.BatchNorm2d(out_channels)
        self.bnorm2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        resample = nn.ConvTranspose2d if up else nn.Conv2d
        self.transform = resample(out_channels, out_channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        h = self.bnorm1(self.relu(self.conv1(x)))
        h = h + self.relu(self.time_mlp(time_embedding))[:, :, None, None]  # [B, C] -> [B, C, 1, 1]
        h = self.bnorm2(self.relu(self.conv2(h)))
        return self.transform(h)


class BlockUNet(nn.Module):
    """doc 32's U-Net (seed 002): conv0, down Blocks, up Blocks fed [x, skip], 1×1 output conv.

    ``down_channels = [c0, c1, …, cn]``: conv0 maps the input to c0 and down Block i maps
    c(i) → c(i+1) at half the size. Up Block j concatenates the current features with the
    output of the matching down Block (deepest first) and maps them to ``up_channels[j]`` at
    twice the size, so the last up Block is back at full resolution. The seed's sizes are
    the defaults: ``[64, 128, 256, 256]`` down, ``[128, 64, 64]`` up, ``time_embedding_dim=256``.

    One repair to the seed, whose channel counts only add up for its first up Block: each up
    Block's first conv takes (current + skip) channels instead of twice its own input.

    Conditioning: ``num_classes`` adds a learned class vector to the time embedding (after
    its ReLU), as the seed's class-conditional exercise asks; ``cross_attention_dim`` puts
    cross-attention after the two deepest down Blocks and after the first up Block;
    ``attention`` puts self-attention after the deepest down Block. Inputs are zero-padded
    to sides divisible by 2^n (8 by default) and the output cropped back.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int | None = None,
        down_channels: list[int] = [64, 128, 256, 256],  # noqa: B006 - plain data, never mutated
        up_channels: list[int] = [128, 64, 64],  # noqa: B006
        time_embedding_dim: int = 256,
        attention: bool = False,
        attention_heads: int = 4,
        num_classes: int | None = None,
        cross_attention_dim: int | None = None,
        cross_attention_heads: int = 4,
    ):
        super().__init__()
        check_constructor_conditioning("block_unet", num_classes, cross_attention_dim)
        if len(down_channels) < 2 or len(up_channels) != len(down_channels) - 1:
            raise ValueError(
                "block_unet: down_channels needs n + 1 >= 2 entries and up_channels n entries "
                f"(one per down Block), got {len(down_channels)} and {len(up_channels)}"
            )
        out_channels = in_channels if out_channels is None else out_channels
        self.num_classes = num_classes
        self.cross_attention_dim = cross_attention_dim
        num_levels = len(up_channels)
        self.size_multiple = 2**num_levels

        def attention_at(channels: int, *, self_attention: bool = False, cross_attention: bool = True) -> Attention:
            return Attention(
                channels,
                self_attention=self_attention,
                cross_attention_dim=cross_attention_dim if cross_attention else None,
                attention_heads=attention_heads,
                cross_attention_heads=cross_attention_heads,
                norm_groups=32,
            )

        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(time_embedding_dim, freq_shift=1),
            nn.Linear(time_embedding_dim, time_embedding_dim),
            nn.ReLU(),
        )
        self.class_embedding = ClassEmbedding(num_classes, time_embedding_dim) if num_classes is not None else None

        self.conv0 = nn.Conv2d(in_channels, down_channels[0], 3, padding=1)
        self.downs = nn.ModuleList(
            Block(down_channels[i], down_channels[i + 1], time_embedding_dim, up=False) for i in range(num_levels)
        )
        # Cross-attention after the two deepest down Blocks (H/2^(n-1) and H/2^n), self-attention at H/2^n.
        self.down_attentions = nn.ModuleList(
            attention_at(
                down_channels[i + 1],
                self_attention=attention and i == num_levels - 1,
                cross_attention=i >= num_levels - 2,
            )
            for i in range(num_levels)
        )

        self.ups = nn.ModuleList()
        channels = down_channels[-1]
        for j, up_out in enumerate(up_channels):
            skip_channels = down_channels[num_levels - j]
            self.ups.append(Block(channels + skip_channels, up_out, time_embedding_dim, up=True))
            channels = up_out
        self.up_attention = attention_at(up_channels[0])
        self.output = nn.Conv2d(channels, out_channels, 1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = check_inputs(
            "block_unet",
            x,
            t,
            class_labels,
            context,
            num_classes=self.num_classes,
            cross_attention_dim=self.cross_attention_dim,
        )
        emb = self.time_mlp(t)  # [B, time_embedding_dim]
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels, x.shape[0])
        x, size = pad_to_multiple(x, self.size_multiple)

        h = self.conv0(x)
        residuals = []
        for down, attention in zip(self.downs, self.down_attentions):
            h = attention(down(h, emb), context)
            residuals.append(h)

        for j, up in enumerate(self.ups):
            h = up(torch.cat([h, residuals.pop()], dim=1), emb)
            if j == 0:
                h = self.up_attention(h, context)
        return crop_to(self.output(h), size)
