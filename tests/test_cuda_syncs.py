"""On a CUDA device, the training and sampling loops queue their work without waiting for the GPU.

``torch.cuda.set_sync_debug_mode("warn")`` makes every call that synchronizes the host with the
device warn (a read-back such as ``.item()``, a blocking copy, ``nonzero``). Each test counts
them, by the line that made them, for a short and a longer run of the same loop: the difference
is what the extra steps cost, and it must be nothing. (Training reads its losses back every
``train.loss_readback_every`` steps by design; the runs here stay below one interval.) The CPU
half of this guarantee, that the loops read no tensor back, is tests/test_host_syncs.py.
Skipped without CUDA.
"""

import collections
import contextlib
import warnings

import pytest
import torch

import minild
from minild.devices import resolve_batch_size
from tests.conftest import tiny_config
from tests.test_train import tiny_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def cuda_syncs():
    """Yields a Counter, filled on exit, of the places ("file:line") that synchronized inside."""
    places: collections.Counter = collections.Counter()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield places
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:
        if "synchroniz" in str(warning.message):
            places[f"{warning.filename}:{warning.lineno}"] += 1


def per_step_syncs(run, short: int, long: int) -> collections.Counter:
    """Syncs that ``run(long)`` makes beyond ``run(short)``, after one warm-up run."""
    run(2)
    with cuda_syncs() as few:
        run(short)
    with cuda_syncs() as many:
        run(long)
    return many - few


CUDA_TRAIN = {"device": "cuda", "batch_size": 16, "p_uncond": 0.1, "loss_readback_every": 1000}


@pytest.mark.parametrize("compile_mode", ["off", "reduce-overhead"])
def test_training_steps_do_not_wait_for_the_gpu(tmp_path, compile_mode):
    hooks = ["progress", {"name": "ema", "decay": 0.9}, {"name": "metrics_log", "flush_every": 1000}]
    config = tiny_config(model={"num_classes": 10}, train={**CUDA_TRAIN, "hooks": hooks, "compile": compile_mode})
    pipe, dataset = minild.Pipeline.from_config(config), tiny_dataset(500)  # 31 steps an epoch

    def run(steps):
        pipe.train(dataset, max_steps=steps, run_dir=tmp_path / f"run-{steps}")

    extra = per_step_syncs(run, 4, 24)
    assert not extra, f"host syncs that grow with the number of steps: {dict(extra)}"


@pytest.mark.parametrize("sampler", [{"name": "ddpm"}, {"name": "ddim", "eta": 1.0}, {"name": "dpm_solver_pp"}])
@pytest.mark.parametrize("guidance", ["cfg", "apg", "cfg_rescale", "cfg_interval"])
def test_sampling_steps_do_not_wait_for_the_gpu(sampler, guidance):
    pipe = minild.Pipeline.from_config(tiny_config(model={"num_classes": 10}, train={"device": "cuda"}))

    def run(steps):
        pipe.generate(class_labels=[1, 2, 3], num_inference_steps=steps, sampler=sampler, guidance=guidance,
                      guidance_scale=2.0, seed=0)

    extra = per_step_syncs(run, 3, 12)
    assert not extra, f"host syncs that grow with the number of steps: {dict(extra)}"


def test_auto_chunk_takes_a_thousand_digits_at_once_on_a_gpu():
    if torch.cuda.mem_get_info()[0] < 16 << 30:
        pytest.skip("needs 16 GiB of free GPU memory")
    model = minild.create("model", "simple_unet", in_channels=1, base_channels=32, num_classes=10).cuda()
    assert resolve_batch_size("auto", 1000, "cuda", model, (1, 28, 28)) == 1000
