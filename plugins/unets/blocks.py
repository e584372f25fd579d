"""Building blocks shared by the built-in eps-models: timestep and class embeddings,
padding to a size the architecture can halve, attention blocks, conditioning checks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# ---------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------


def sinusoidal_frequencies(dim: int, freq_shift: float = 1.0, max_period: float = 10000.0) -> torch.Tensor:
    """The ``dim // 2`` angular frequencies of the Transformer position encoding.

    ω_i = max_period ** (−i / (dim/2 − freq_shift)), i = 0 … dim/2 − 1. ``freq_shift=1``
    is the Lab 2.6.1 / doc 32 formula, ``freq_shift=0`` the Module-16 one.
    """
    half_dim = dim // 2
    if half_dim - freq_shift <= 0:
        raise ValueError(f"a sinusoidal embedding needs dim >= {2 * (int(freq_shift) + 1)}, got dim={dim}")
    exponent = -math.log(max_period) * torch.arange(half_dim, dtype=torch.float32) / (half_dim - freq_shift)
    return torch.exp(exponent)


class SinusoidalEmbedding(nn.Module):
    """``t [B]`` → ``[B, dim]`` = [sin(t·ω), cos(t·ω)], zero-padded when ``dim`` is odd.

    The frequencies are computed once and kept as a non-persistent buffer, so they
    follow the module across devices without appearing in the state dict.
    """

    def __init__(self, dim: int, freq_shift: float = 1.0):
        super().__init__()
        self.dim = dim
        self.register_buffer("frequencies", sinusoidal_frequencies(dim, freq_shift), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.frequencies[None, :]  # [B, dim // 2]
        embedding = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [B, 2 * (dim // 2)]
        if self.dim % 2:
            embedding = F.pad(embedding, (0, 1))
        return embedding


# ---------------------------------------------------------------------------
# Class labels
# ---------------------------------------------------------------------------


class ClassEmbedding(nn.Module):
    """Learned class vectors; row ``num_classes`` is the null (unconditional) class.

    ``class_labels=None`` embeds every sample as the null class, which is what
    classifier-free guidance feeds the model for its unconditional prediction.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, class_labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if class_labels is None:
            class_labels = torch.full(
                (batch_size,), self.num_classes, dtype=torch.long, device=self.embedding.weight.device
            )
        return self.embedding(class_labels)  # [B, dim]


class PooledContextEmbedding(nn.Module):
    """A context's mean over its L positions (padding included: the text encoders pad every prompt
    to the same ``max_length``), normalised and projected to ``dim``: Imagen's pooled text
    embedding, added to the time embedding so that every block sees the whole prompt, beside the
    cross-attention that reads it token by token. ``[B, L, D]`` → ``[B, dim]``."""

    def __init__(self, context_dim: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(context_dim)
        self.proj = nn.Linear(context_dim, dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(context.mean(dim=1)))


# ---------------------------------------------------------------------------
# Normalisation and padding
# ---------------------------------------------------------------------------


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` that divides ``channels``."""
    groups = max(1, min(max_groups, channels))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``x [B, C, H, W]`` evenly on all sides so H and W divide by ``multiple``.

    Returns the padded tensor and the original ``(H, W)`` for ``crop_to``. Zero padding
    (rather than reflection) works for any size and gives the network a constant border
    it can learn to recognise; the padded margin is cropped from the output.
    """
    height, width = x.shape[-2:]
    pad_h = -height % multiple
    pad_w = -width % multiple
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return x, (height, width)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo ``pad_to_multiple``: cut the centred ``size = (H, W)`` window out of ``x``."""
    height, width = size
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


def _head_count(channels: int, heads: int, argument: str) -> int:
    if heads < 1 or channels % heads:
        raise ValueError(f"{argument}={heads} must be a positive divisor of the {channels} channels it attends over")
    return heads


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions of a feature map, pre-norm, residual."""

    def __init__(self, channels: int, heads: int = 4, norm_groups: int = 32):
        super().__init__()
        self.heads = _head_count(channels, heads, "attention_heads")
        self.norm = group_norm(channels, norm_groups)
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        q, k, v = rearrange(self.to_qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, H*W, C / heads]
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # [B, H*W, C]
        return x + rearrange(out, "b (h w) c -> b c h w", h=height, w=width)


class CrossAttention(nn.Module):
    """Image features attend to a context sequence (doc 32's text-image cross-attention).

    Queries come from the LayerNorm-ed feature map ``x [B, C, H, W]``, keys and values
    from ``context [B, L, D]``; ``heads`` heads of ``C / heads`` dimensions; residual.
    """

    def __init__(self, channels: int, context_dim: int, heads: int = 4):
        super().__init__()
        self.heads = _head_count(channels, heads, "cross_attention_heads")
        self.norm = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = self.norm(rearrange(x, "b c h w -> b (h w) c"))
        q = rearrange(self.to_q(tokens), "b n (h d) -> b h n d", h=self.heads)  # [B, heads, H*W, d]
        k = rearrange(self.to_k(context), "b l (h d) -> b h l d", h=self.heads)  # [B, heads, L, d]
        v = rearrange(self.to_v(context), "b l (h d) -> b h l d", h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, H*W, d]
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # [B, H*W, C]
        return x + rearrange(out, "b (h w) c -> b c h w", h=height, w=width)


class Attention(nn.Module):
    """The optional attention at one UNet level: self-attention, cross-attention, both or neither.

    With neither it is the identity, so a model can place one at every low-resolution
    level and let its constructor arguments decide what is inside.
    """

    def __init__(
        self,
        channels: int,
        *,
        self_attention: bool,
        cross_attention_dim: int | None,
        attention_heads: int,
        cross_attention_heads: int,
        norm_groups: int,
    ):
        super().__init__()
        self.self_attention = SelfAttention(channels, attention_heads, norm_groups) if self_attention else None
        self.cross_attention = (
            CrossAttention(channels, cross_attention_dim, cross_attention_heads)
            if cross_attention_dim is not None
            else None
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if self.self_attention is not None:
            x = self.self_attention(x)
        if self.cross_attention is not None:
            x = self.cross_attention(x, context)
        return x


# ---------------------------------------------------------------------------
# Conditioning checks shared by every model's forward
# ---------------------------------------------------------------------------


def check_constructor_conditioning(model: str, num_classes: int | None, cross_attention_dim: int | None) -> None:
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"{model}: num_classes must be a positive int or None, got {num_classes}")
    if cross_attention_dim is not None and cross_attention_dim < 1:
        raise ValueError(f"{model}: cross_attention_dim must be a positive int or None, got {cross_attention_dim}")


def check_inputs(
    model: str,
    x: torch.Tensor,
    t: torch.Tensor,
    class_labels: torch.Tensor | None,
    context: torch.Tensor | None,
    *,
    num_classes: int | None,
    cross_attention_dim: int | None,
) -> torch.Tensor:
    """Validate one forward call's arguments and return ``t`` as a ``[B]`` tensor.

    Shape checks are free; the label range check costs one reduction, skipped while
    tracing or compiling so it never breaks a graph.
    """
    if x.ndim != 4:
        raise ValueError(f"{model}: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    batch_size = x.shape[0]
    if t.ndim == 0:
        t = t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"{model}: t must be [B] = [{batch_size}] timesteps, got shape {tuple(t.shape)}")

    if class_labels is not None:
        if num_classes is None:
            raise ValueError(
                f"{model} got class_labels but was built without classes; set the constructor argument "
                "num_classes to train or sample class-conditionally"
            )
        if class_labels.shape != (batch_size,) or class_labels.is_floating_point():
            raise ValueError(
                f"{model}: class_labels must be [B] = [{batch_size}] integers, got "
                f"{class_labels.dtype} of shape {tuple(class_labels.shape)}"
            )
        # Reading the range back is a host sync on an accelerator, once per forward: checked on CPU
        # tensors only. On a GPU the labels were checked once before the loop (Pipeline.generate,
        # the trainer's data check), and an out-of-range one still fails in the embedding lookup.
        checkable = class_labels.device.type == "cpu" and not (torch.jit.is_tracing() or torch.compiler.is_compiling())
        if checkable:
            if bool(((class_labels < 0) | (class_labels > num_classes)).any()):
                raise ValueError(
                    f"{model}: class_labels must lie in [0, {num_classes}] ({num_classes} = the null class), "
                    f"got values from {int(class_labels.min())} to {int(class_labels.max())}"
                )

    if cross_attention_dim is None:
        if context is not None:
            raise ValueError(
                f"{model} got a context but was built without cross-attention; set the constructor argument "
                "cross_attention_dim to the context's last dimension D"
            )
    elif context is None:
        raise ValueError(
            f"{model} was built with cross_attention_dim={cross_attention_dim} and needs context [B, L, D]; "
            "pass the (possibly empty-prompt) text embeddings"
        )
    elif context.ndim != 3 or context.shape[0] != batch_size or context.shape[-1] != cross_attention_dim:
        raise ValueError(
            f"{model}: context must be [B, L, D] = [{batch_size}, L, {cross_attention_dim}], "
            f"got shape {tuple(context.shape)}"
        )
    return t
