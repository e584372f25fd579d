"""Devices: which device a config's name means, the memory format that is faster on it, and how
many images ``generate`` denoises at once there.

On a CPU small chunks keep the caches warm; on a GPU one big chunk amortises the per-step
kernel launches, so the chunk is as large as free memory allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

CPU_BATCH_SIZE = 64  # 1,000 guided 28×28 digits stay well under 1 GiB of RSS (benchmarks/README.md)
MPS_BATCH_SIZE = 32  # unified memory shared with the system: stay small
MAX_BATCH_SIZE = 4096  # beyond this a GPU gains nothing per image (launch overhead is amortised)
MEMORY_FRACTION = 0.5  # of the free device memory a chunk's forwards may take
FORWARDS_PER_IMAGE = 2  # classifier-free guidance runs the conditional and unconditional halves together
# Used when no forward can be measured: bytes of activations per input element of one image
# (float32, ~1k live activations per input value, generous for minild's UNets).
FALLBACK_BYTES_PER_ELEMENT = 4 * 1024


def resolve_device(name: str) -> torch.device:
    """The device a config names: ``"auto"`` is CUDA when there is one, else MPS, else the CPU;
    otherwise ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return torch.device(name)


def use_channels_last(setting: bool | None, device: torch.device, compiled: bool) -> bool:
    """``train.channels_last`` for a model on ``device``: as configured, or for None where it was
    measured faster: on CPUs (an inference forward 1.3× faster, benchmarks/README.md) and on CUDA
    under torch.compile (the layout of the measured compiled step); not for the eager model on
    CUDA, where the contiguous layout trained 1.15–1.35× and sampled 1.25× faster on an H200, nor
    on MPS, which does not take it."""
    if device.type == "mps":
        return False
    if setting is not None:
        return setting
    return device.type == "cpu" or (device.type == "cuda" and compiled)


def default_batch_size(
    device: torch.device | str,
    image_shape: Sequence[int],
    *,
    bytes_per_image: float | None = None,
    free_bytes: int | None = None,
) -> int:
    """The chunk size ``generate`` uses when ``batch_size="auto"``.

    - CPU: 64; MPS: 32.
    - CUDA: ``MEMORY_FRACTION`` of the free memory (``torch.cuda.mem_get_info``, or ``free_bytes``)
      divided by the bytes one image costs in a guided forward: ``FORWARDS_PER_IMAGE`` ×
      ``bytes_per_image`` (measure it with ``measure_bytes_per_image``; without it, an estimate
      of ``FALLBACK_BYTES_PER_ELEMENT`` per element of ``image_shape``), between 1 and ``MAX_BATCH_SIZE``.
    """
    device = torch.device(device)
    if device.type == "mps":
        return MPS_BATCH_SIZE
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    if bytes_per_image is None:
        elements = 1
        for size in image_shape:
            elements *= int(size)
        bytes_per_image = FALLBACK_BYTES_PER_ELEMENT * elements
    per_image = FORWARDS_PER_IMAGE * max(float(bytes_per_image), 1.0)
    return int(min(max(MEMORY_FRACTION * free_bytes // per_image, 1), MAX_BATCH_SIZE))


def measure_bytes_per_image(
    forward: Callable[[torch.Tensor], object], image_shape: Sequence[int], device: torch.device | str, probe: int = 8
) -> float | None:
    """Peak CUDA memory of ``forward(x)`` on ``probe`` images, per image (None off CUDA or if the
    forward fails): what a chunk of n images needs beyond the weights is about n times this."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    x = torch.zeros((probe, *image_shape), device=device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.inference_mode():
            forward(x)
    except (RuntimeError, ValueError, TypeError):
        return None
    peak = torch.cuda.max_memory_allocated(device)
    return max(peak - before, 0) / probe


def resolve_batch_size(
    batch_size: int | str | None, num_images: int, device: torch.device | str, model: torch.nn.Module,
    image_shape: Sequence[int],
) -> int:
    """``generate``'s chunk size: ``batch_size`` as given, all ``num_images`` for None, or for
    ``"auto"`` ``default_batch_size`` (on CUDA from one measured forward of ``model``)."""
    if batch_size is None:
        return num_images
    if batch_size == "auto":
        def forward(x):
            return model(x, torch.zeros(len(x), dtype=torch.long, device=x.device))

        measured = measure_bytes_per_image(forward, image_shape, device)
        return min(default_batch_size(device, image_shape, bytes_per_image=measured), num_images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None (all at once), or 'auto'; got {batch_size!r}")
    return batch_size
