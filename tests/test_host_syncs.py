"""No host sync in the sampling loops: the samplers, a guided class-conditional UNet and the
diffusers adapter run on the "meta" device, where any read-back of a tensor value (``.item()``,
``bool()``, ``int()``, ``.tolist()``) raises — so a loop that completes there never waits on a GPU."""

import pytest
import torch

import minild
from minild.pipeline.guidance import cfg_model_fn
from minild.pipeline.guidance import guided_model_fn as guide
from minild.lab.scheduler_adapter import make_scheduler
from minild.lab.tiny_sdxl import SDXL_BASE_SCHEDULER_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")

META = torch.device("meta")
SAMPLERS = [("ddpm", {}), ("ddim", {"eta": 1.0}), ("dpm_solver_pp", {})]


def test_a_read_back_on_meta_raises():
    with pytest.raises(RuntimeError):
        bool(torch.zeros((), device=META))


def guided_unet(name="simple_unet"):
    model = minild.create("model", name, in_channels=1, base_channels=8, num_classes=10, time_embedding_dim=16)
    model = model.to(META).eval()
    cond = {"class_labels": torch.tensor([1, 2], device=META)}
    uncond = {"class_labels": torch.full((2,), 10, device=META)}
    return cfg_model_fn(model, cond, uncond, 3.0)


@pytest.mark.parametrize("name, params", SAMPLERS)
def test_sampling_loop_with_a_guided_unet_reads_nothing_back(name, params):
    sampler = minild.create("sampler", name, minild.create("schedule", "linear", num_timesteps=100), **params)
    x = sampler.sample(guided_unet(), (2, 1, 8, 8), num_inference_steps=4, latents=torch.zeros(2, 1, 8, 8, device=META),
                       generator=torch.Generator().manual_seed(0))
    assert x.device == META and x.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("name, params", SAMPLERS)
def test_guidance_that_depends_on_t_reads_nothing_back_under_minilds_samplers(name, params):
    # cfg_interval decides per step whether to run the unconditional pass: the samplers hand it
    # the timestep as an int, so it never reads t back from the device.
    schedule = minild.create("schedule", "linear", num_timesteps=100)
    model = minild.create("model", "simple_unet", in_channels=1, base_channels=8, num_classes=10,
                          time_embedding_dim=16).to(META).eval()
    guider = minild.create("guidance", "cfg_interval", scale=3.0, sigma_low=0.3, sigma_high=2.0).bind(schedule)
    cond = {"class_labels": torch.tensor([1, 2], device=META)}
    uncond = {"class_labels": torch.full((2,), 10, device=META)}
    batch_sizes = []
    model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    sampler = minild.create("sampler", name, schedule, **params)
    sampler.sample(guide(model, cond, uncond, guider), (2, 1, 8, 8), num_inference_steps=8,
                   latents=torch.zeros(2, 1, 8, 8, device=META), generator=torch.Generator().manual_seed(0))
    assert set(batch_sizes) == {2, 4}  # one pass outside the interval, both halves inside it


@pytest.mark.parametrize("name, params", SAMPLERS)
def test_adapter_steps_read_nothing_back(name, params):
    scheduler = make_scheduler(f"minild:{name}", SDXL_BASE_SCHEDULER_CONFIG, **params)
    scheduler.set_timesteps(4, device=META)
    scheduler.set_begin_index(0)  # as diffusers' SDXL pipeline does
    x = torch.zeros(1, 4, 8, 8, device=META) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:
        eps = scheduler.scale_model_input(x, t) * 0.5
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    assert x.device == META
