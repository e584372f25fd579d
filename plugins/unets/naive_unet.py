"""minDiffusion's NaiveUnet: Conv3 blocks, max-pool down, concat-then-transposed-conv up,
a 1×1 bottleneck vector and the TimeSiren timestep embedding."""

from __future__ import annotations

import math

import torch
from torch import nn

from minild_plugins.unets.blocks import (
    Attention,
    ClassEmbedding,
    check_constructor_conditioning,
    check_inputs,
    crop_to,
    group_norm,
    pad_to_multiple,
)


class Conv3(nn.Module):
    """conv3×3 → GroupNorm → ReLU, then two more; optionally residual, rescaled by 1/√2."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, *, residual: bool = False):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels, norm_groups),
            nn.ReLU(),
        )
        self.conv = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            group_norm(out_channels, norm_groups),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            group_norm(out_channels, norm_groups),
            nn.ReLU(),
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.main(x)
        if self.residual:
            # Adding two roughly unit-variance maps doubles the variance; 1/√2 restores it.
            return (x + self.conv(x)) / math.sqrt(2)
        return self.conv(x)


class UnetDown(nn.Module):
    """Conv3 then MaxPool2d(2): halves H and W."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        self.model = nn.Sequential(Conv3(in_channels, out_channels, norm_groups), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetUp(nn.Module):
    """Concatenate [x, skip], ConvTranspose2d(2, stride 2) (doubles H and W), two Conv3.

    ``in_channels`` counts both halves of the concatenation.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        self.model = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2),
            Conv3(out_channels, out_channels, norm_groups),
            Conv3(out_channels, out_channels, norm_groups),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.model(torch.cat([x, skip], dim=1))


class TimeSiren(nn.Module):
    """Scalar time in [0, 1) → sin(Linear(1, d, no bias)) → Linear(d, d)."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(1, embedding_dim, bias=False)
        self.lin2 = nn.Linear(embedding_dim, embedding_dim)

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.sin(self.lin1(time.view(-1, 1))))  # [B] -> [B, embedding_dim]


class NaiveUnet(nn.Module):
    """minDiffusion's NaiveUnet (seed 004) with ``base_channels`` for the seed's ``n_feat``.

    init Conv3 (residual) at H → UnetDown ×3 to H/8 with b, 2b, 2b channels → AvgPool2d(4) +
    ReLU to a 2b-vector at H/32 → add the time embedding → ConvTranspose2d(4, stride 4) back
    to H/8 → UnetUp ×3 with the down outputs as skips, adding the time embedding again after
    the first → conv 3×3 on [up3, init features]. The time embedding is TimeSiren of
    t / num_train_timesteps (the seed feeds the normalised time). The seed trains CIFAR-10
    and CelebA with ``n_feat=128``; the default here is 64 for CPU budgets. Module names
    follow the seed, so an unconditional model has the seed's state-dict keys.

    Conditioning: ``num_classes`` adds a learned class vector to the time embedding, so it
    enters wherever the time does; ``cross_attention_dim`` puts cross-attention after the
    deepest UnetDown (H/8), after the bottleneck's up-projection (H/8) and after the first
    UnetUp (H/4); ``attention`` puts self-attention after the up-projection. Inputs are
    zero-padded to sides divisible by 32 and the output cropped back.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 64,
        num_train_timesteps: int = 1000,
        norm_groups: int = 8,
        attention: bool = False,
        attention_heads: int = 4,
        num_classes: int | None = None,
        cross_attention_dim: int | None = None,
        cross_attention_heads: int = 4,
    ):
        super().__init__()
        check_constructor_conditioning("naive_unet", num_classes, cross_attention_dim)
        if num_train_timesteps < 1:
            raise ValueError(f"naive_unet: num_train_timesteps must be >= 1, got {num_train_timesteps}")
        out_channels = in_channels if out_channels is None else out_channels
        self.num_classes = num_classes
        self.cross_attention_dim = cross_attention_dim
        self.num_train_timesteps = num_train_timesteps
        b = base_channels

        def attention_at(channels: int, self_attention: bool = False) -> Attention:
            return Attention(
                channels,
                self_attention=self_attention,
                cross_attention_dim=cross_attention_dim,
                attention_heads=attention_heads,
                cross_attention_heads=cross_attention_heads,
                norm_groups=norm_groups,
            )

        self.init_conv = Conv3(in_channels, b, norm_groups, residual=True)
        self.down1 = UnetDown(b, b, norm_groups)
        self.down2 = UnetDown(b, 2 * b, norm_groups)
        self.down3 = UnetDown(2 * b, 2 * b, norm_groups)
        self.down3_attention = attention_at(2 * b)

        self.to_vec = nn.Sequential(nn.AvgPool2d(4), nn.ReLU())
        self.timeembed = TimeSiren(2 * b)
        self.class_embedding = ClassEmbedding(num_classes, 2 * b) if num_classes is not None else None

        self.up0 = nn.Sequential(
            nn.ConvTranspose2d(2 * b, 2 * b, 4, stride=4),
            group_norm(2 * b, norm_groups),
            nn.ReLU(),
        )
        self.up0_attention = attention_at(2 * b, self_attention=attention)
        self.up1 = UnetUp(4 * b, 2 * b, norm_groups)
        self.up1_attention = attention_at(2 * b)
        self.up2 = UnetUp(4 * b, b, norm_groups)
        self.up3 = UnetUp(2 * b, b, norm_groups)
        self.out = nn.Conv2d(2 * b, out_channels, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = check_inputs(
            "naive_unet",
            x,
            t,
            class_labels,
            context,
            num_classes=self.num_classes,
            cross_attention_dim=self.cross_attention_dim,
        )
        emb = self.timeembed(t.to(x.dtype) / self.num_train_timesteps)  # [B, 2b]
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels, x.shape[0])
        emb = emb[:, :, None, None]  # [B, 2b, 1, 1]
        x, size = pad_to_multiple(x, 32)

        x = self.init_conv(x)  # [B, b, H, W]
        down1 = self.down1(x)  # [B, b, H/2, W/2]
        down2 = self.down2(down1)  # [B, 2b, H/4, W/4]
        down3 = self.down3_attention(self.down3(down2), context)  # [B, 2b, H/8, W/8]

        bottleneck = self.to_vec(down3)  # [B, 2b, H/32, W/32]
        bottleneck = self.up0_attention(self.up0(bottleneck + emb), context)  # [B, 2b, H/8, W/8]

        up1 = self.up1_attention(self.up1(bottleneck, down3) + emb, context)  # [B, 2b, H/4, W/4]
        up2 = self.up2(up1, down2)  # [B, b, H/2, W/2]
        up3 = self.up3(up2, down1)  # [B, b, H, W]
        out = self.out(torch.cat([up3, x], dim=1))
        return crop_to(out, size)
