"""generate's chunk size by device: 64 on a CPU, 32 on MPS, on CUDA what half the free memory holds."""

import pytest
import torch

import minild
from minild.devices import (
    CPU_BATCH_SIZE,
    MAX_BATCH_SIZE,
    MPS_BATCH_SIZE,
    default_batch_size,
    measure_bytes_per_image,
    resolve_batch_size,
)
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cpu_and_mps_have_fixed_chunk_sizes():
    assert default_batch_size("cpu", (1, 28, 28)) == CPU_BATCH_SIZE == 64
    assert default_batch_size(torch.device("mps"), (1, 28, 28)) == MPS_BATCH_SIZE


def test_cuda_chunk_is_half_the_free_memory_over_a_guided_image():
    gib = 1 << 30
    # 10 GiB free, 1 MiB per image per forward, two forwards per guided image: 5 GiB / 2 MiB = 2560.
    assert default_batch_size("cuda", (1, 28, 28), bytes_per_image=1 << 20, free_bytes=10 * gib) == 2560
    assert default_batch_size("cuda", (1, 28, 28), bytes_per_image=1 << 20, free_bytes=1000 * gib) == MAX_BATCH_SIZE
    assert default_batch_size("cuda", (4, 128, 128), bytes_per_image=1 << 40, free_bytes=gib) == 1
    # Unmeasured: 4 KiB per input element, 3,136 KiB for a 28×28 digit → 5 GiB / 6,272 KiB = 835.
    assert default_batch_size("cuda", (1, 28, 28), free_bytes=10 * gib) == 835


def test_cuda_chunk_reads_free_memory_from_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 << 30, 8 << 30))
    assert default_batch_size("cuda:0", (1, 28, 28), bytes_per_image=1 << 20) == 1024


def test_measuring_a_forward_needs_cuda():
    assert measure_bytes_per_image(lambda x: x * 2, (1, 8, 8), "cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measured_bytes_per_image_grow_with_the_image():
    small = measure_bytes_per_image(lambda x: torch.cat([x] * 16), (1, 16, 16), "cuda")
    large = measure_bytes_per_image(lambda x: torch.cat([x] * 16), (1, 64, 64), "cuda")
    assert 0 < small < large


def test_resolve_batch_size_takes_given_sizes_none_and_auto():
    model = minild.create("model", "dummy_eps", in_channels=1)
    assert resolve_batch_size(16, 100, "cpu", model, (1, 8, 8)) == 16
    assert resolve_batch_size(None, 100, "cpu", model, (1, 8, 8)) == 100
    assert resolve_batch_size("auto", 100, "cpu", model, (1, 8, 8)) == 64
    assert resolve_batch_size("auto", 10, "cpu", model, (1, 8, 8)) == 10
    for bad in (0, -1, 2.5, True, "big"):
        with pytest.raises(ValueError, match="batch_size must be a positive integer or None"):
            resolve_batch_size(bad, 100, "cpu", model, (1, 8, 8))


def test_generate_chunks_by_device_by_default():
    pipe = minild.Pipeline.from_config(tiny_config())
    sizes = []
    pipe.model.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    pipe.generate(70, num_inference_steps=1, seed=0, device="cpu")
    assert sizes == [64, 6]
