"""minDiffusion's DummyEpsModel: a plain stack of 7×7 conv + BatchNorm + LeakyReLU that
never looks at the timestep — a baseline, not a real denoiser."""

from __future__ import annotations

import torch
from torch import nn

from minild_plugins.unets.blocks import check_inputs


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 7, padding=3),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(),
    )


class DummyEpsModel(nn.Module):
    """minDiffusion's MNIST eps-model (seed 004): ``conv_block`` per entry of ``channels``,
    then a 3×3 conv back to ``out_channels``. No down- or up-sampling, no skips, any size.

    It ignores ``t``: one function must serve every noise level, so it is a baseline for
    what the UNets gain from time conditioning. With no time input there is nothing to add
    a class vector to, so it cannot be conditioned: setting ``num_classes`` or
    ``cross_attention_dim`` raises ``ValueError`` (they exist so a config that sets them
    gets that message rather than an unknown-argument error). The seed's stack is
    ``[64, 128, 256, 512, 256, 128, 64]``; the default halves every width, ~4× cheaper.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: list[int] = [32, 64, 128, 256, 128, 64, 32],  # noqa: B006 - plain data, never mutated
        num_classes: int | None = None,
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        if num_classes is not None or cross_attention_dim is not None:
            raise ValueError(
                "dummy_eps cannot be class- or text-conditioned (it has no time input to add a class to); "
                "leave num_classes and cross_attention_dim unset, or pick a UNet such as simple_unet"
            )
        if not channels:
            raise ValueError("dummy_eps: channels needs at least one width, e.g. [64, 128, 64]")
        out_channels = in_channels if out_channels is None else out_channels
        widths = [in_channels, *channels]
        self.conv = nn.Sequential(
            *(conv_block(widths[i], widths[i + 1]) for i in range(len(channels))),
            nn.Conv2d(channels[-1], out_channels, 3, padding=1),
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if class_labels is not None or context is not None:
            raise ValueError(
                "dummy_eps cannot be conditioned: it has no time or class input to combine them with; "
                "pass class_labels=None and context=None, or pick a UNet such as simple_unet"
            )
        check_inputs("dummy_eps", x, t, None, None, num_classes=None, cross_attention_dim=None)
        return self.conv(x)
