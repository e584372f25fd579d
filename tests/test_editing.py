"""Editing with generate(image=…): SDEdit against diffusers' DDIM img2img, inpainting (pixel and
latent, RePaint resampling), the inputs users pass, the errors, and ``minild sample --image``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

import minild
from minild.pipeline import editing
from minild.cli import main
from tests.conftest import tiny_class_pipeline, tiny_config, tiny_latent_class_pipeline

STEPS = 10


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def pipe():
    """A tiny class-conditional 1×28×28 pipeline on a 100-step linear schedule (random weights)."""
    return tiny_class_pipeline()


@pytest.fixture(scope="module")
def latent_pipe(tmp_path_factory):
    """The same on a random digits_vae (1×28×28 ↔ 4×7×7 latents)."""
    return tiny_latent_class_pipeline(tmp_path_factory.mktemp("vae"))


def images(n=2, seed=0, channels=1, size=28):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def lower_half(size=28):
    mask = torch.zeros(1, size, size)
    mask[:, size // 2:] = 1
    return mask


def recorded_timesteps(pipe, **kwargs):
    steps = []
    out = pipe.generate(callback=steps.append, **kwargs)
    return out, [info["t"] for info in steps]


# -- SDEdit against diffusers ----------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.6, 0.35, 1.0])
def test_ddim_img2img_walks_diffusers_timesteps_from_its_add_noise_and_matches_its_loop(pipe, strength):
    scheduler = DDIMScheduler(num_train_timesteps=100, trained_betas=pipe.schedule.betas.numpy(), clip_sample=False,
                              set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    scheduler.set_timesteps(STEPS)
    # diffusers' StableDiffusionImg2ImgPipeline.get_timesteps
    init_timestep = min(int(STEPS * strength), STEPS)
    t_start = max(STEPS - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    image, noise = images(), torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    x = scheduler.add_noise(image * 2 - 1, noise, timesteps[:1])
    model = pipe.ema_model if pipe.ema_model is not None else pipe.model
    with torch.no_grad():
        for t in timesteps:
            eps = model(x, t.expand(2), class_labels=torch.tensor([3, 7]))
            x = scheduler.step(eps, t, x).prev_sample
    expected = ((x + 1) / 2).clamp(0, 1)

    out, seen = recorded_timesteps(pipe, image=image, strength=strength, class_labels=[3, 7], latents=noise,
                                   num_inference_steps=STEPS, sampler="ddim")
    assert seen == timesteps.tolist()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_noised_start_equals_diffusers_add_noise(pipe):
    scheduler = DDIMScheduler(num_train_timesteps=100, trained_betas=pipe.schedule.betas.numpy())
    x0, noise = images() * 2 - 1, torch.randn(2, 1, 28, 28)
    for t in (0, 40, 99):
        expected = scheduler.add_noise(x0, noise, torch.tensor([t]))
        torch.testing.assert_close(editing.add_noise(x0, noise, pipe.schedule.alphas_cumprod[t]), expected)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver_pp"])
@pytest.mark.parametrize("strength", [0.25, 0.55, 1.0])
def test_strength_runs_int_of_steps_times_strength_steps(pipe, sampler, strength):
    out, seen = recorded_timesteps(pipe, image=images(), strength=strength, class_labels=[1, 2], guidance_scale=2.0,
                                   num_inference_steps=STEPS, sampler=sampler, seed=0)
    full = minild.create("sampler", sampler, pipe.schedule).timesteps(STEPS)
    assert seen == full[STEPS - int(STEPS * strength):]
    assert out.shape == (2, 1, 28, 28) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("strength", [0.0, 0.05])
def test_strength_too_low_for_one_step_returns_the_input(pipe, strength):
    image = images()
    assert torch.equal(pipe.generate(image=image, strength=strength, num_inference_steps=STEPS), image)


def test_low_strength_stays_closer_to_the_input_than_high(pipe):
    image = images()
    near, far = (pipe.generate(image=image, strength=s, class_labels=[0, 1], num_inference_steps=STEPS, seed=0)
                 for s in (0.2, 1.0))
    assert (near - image).abs().mean() < (far - image).abs().mean()


def test_latent_img2img_encodes_then_decodes(latent_pipe):
    encoded = []
    original = latent_pipe.vae.encode
    latent_pipe.vae.encode = lambda x, generator=None: encoded.append(x.shape) or original(x, generator=generator)
    try:
        out, seen = recorded_timesteps(latent_pipe, image=images(), strength=0.5, class_labels=[4, 5],
                                       num_inference_steps=STEPS, seed=0)
    finally:
        del latent_pipe.vae.encode
    assert encoded == [(2, 1, 28, 28)] and len(seen) == 5
    assert out.shape == (2, 1, 28, 28) and bool(torch.isfinite(out).all())


def test_text_conditioned_img2img(tiny_clip_dir, offline):
    config = tiny_config(model={"cross_attention_dim": 32, "cross_attention_heads": 2},
                         text_encoder={"name": "clip", "pretrained": str(tiny_clip_dir), "max_length": 8})
    config["image_shape"] = [1, 28, 28]
    text_pipe = minild.Pipeline.from_config(config)
    out = text_pipe.generate(image=images(), prompts="a seven", strength=0.5, num_inference_steps=4, seed=0)
    assert out.shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="got 2 images but 3 prompts"):
        text_pipe.generate(image=images(), prompts=["a", "b", "c"], num_inference_steps=4)


# -- inpainting ----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver_pp"])
def test_inpainting_keeps_the_unmasked_pixels_exactly_and_regenerates_the_rest(pipe, sampler):
    image = images()
    out = pipe.generate(image=image, mask=lower_half(), class_labels=[1, 2], guidance_scale=2.0,
                        num_inference_steps=STEPS, sampler=sampler, seed=0)
    assert torch.equal(out[:, :, :14], image[:, :, :14])
    assert (out[:, :, 14:] - image[:, :, 14:]).abs().mean() > 0.05


def test_inpainting_replaces_the_kept_region_by_the_noised_original_after_every_step(pipe):
    image, states = images(), []
    pipe.generate(image=image, mask=lower_half(), num_inference_steps=STEPS, seed=0,
                  callback=lambda info: states.append((info["t"], info["x"][:, :, :14].clone())))
    timesteps = [t for t, _ in states]
    for (_, kept), t_prev in zip(states, timesteps[1:] + [None]):
        if t_prev is None:
            torch.testing.assert_close(kept, image[:, :, :14] * 2 - 1)
        else:  # √ᾱ x0 + √(1 − ᾱ) ε with fresh ε: its mean over pixels tracks √ᾱ x0
            alpha = pipe.schedule.alphas_cumprod[t_prev]
            residual = (kept - alpha.sqrt() * (image[:, :, :14] * 2 - 1)) / (1 - alpha).sqrt()
            assert abs(float(residual.std()) - 1) < 0.2


def test_latent_inpainting_keeps_the_unmasked_pixels(latent_pipe):
    image = images()
    mask = torch.zeros(1, 28, 28)
    mask[:, 5:11, 5:11] = 1  # a box: its latent cells (4×4 pixels each) 1–2 are regenerated
    out = latent_pipe.generate(image=image, mask=mask, class_labels=[1, 2], num_inference_steps=STEPS, seed=0)
    keep = mask == 0
    assert torch.equal(out[:, keep], image[:, keep])
    assert not torch.equal(out, image)


def test_latent_mask_marks_every_cell_with_a_masked_pixel(latent_pipe):
    mask = torch.zeros(1, 28, 28)
    mask[:, 5, 9] = 1  # one pixel, in latent cell (1, 2)
    edit = editing.prepare(latent_pipe, images(1), mask, 1.0, 10, 1)
    editing.plan(edit, latent_pipe, latent_pipe.sampler, "ddim", STEPS, None)
    expected = torch.zeros(1, 1, 7, 7)
    expected[0, 0, 1, 2] = 1
    assert torch.equal(edit.model_mask, expected)


def test_repaint_path_is_the_plain_chain_without_resampling_and_diffusers_schedule_with_it():
    assert editing.repaint_path(5, 10, 1) == [1, 2, 3, 4, 5]
    # diffusers' RePaintScheduler, 4 steps, jump_length 2, jump_n_sample 2: t = 3 2 1 0 1 2 1 0
    # (a jump back of 2 from the clean end), here as positions down the chain.
    assert editing.repaint_path(4, 2, 2) == [1, 2, 3, 4, 2, 3, 4]
    assert editing.repaint_path(6, 2, 3) == [1, 2, 3, 4, 2, 3, 4, 2, 3, 4, 5, 6, 4, 5, 6, 4, 5, 6]


def test_repaint_resampling_runs_the_extra_steps_and_keeps_the_kept_region(pipe):
    image, plain, resampled = images(), [], []
    base = pipe.generate(image=image, mask=lower_half(), num_inference_steps=6, seed=0, sampler="ddpm", callback=plain.append)
    out = pipe.generate(image=image, mask=lower_half(), num_inference_steps=6, seed=0, sampler="ddpm",
                        jump_length=2, jump_n_sample=3, callback=resampled.append)
    assert len(plain) == 6 and len(resampled) == len(editing.repaint_path(6, 2, 3)) - 4  # 4 jumps back up
    assert torch.equal(out[:, :, :14], image[:, :, :14]) and not torch.equal(out, base)


def test_a_list_of_generators_makes_each_edit_independent_of_its_batch(pipe):
    image = images(3)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch = pipe.generate(image=image, mask=lower_half(), sampler="ddpm", num_inference_steps=4, generator=generators,
                          class_labels=[0, 1, 2])
    alone = pipe.generate(image=image[1:2], mask=lower_half(), sampler="ddpm", num_inference_steps=4,
                          generator=[torch.Generator().manual_seed(2)], class_labels=[1])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-5)


# -- inputs --------------------------------------------------------------------------------


def test_pil_images_paths_and_lists_give_what_the_tensor_gives(pipe, tmp_path):
    tensor = (images(1) * 255).round() / 255
    picture = Image.fromarray((tensor[0, 0].numpy() * 255).round().astype("uint8"), mode="L")
    picture.save(tmp_path / "in.png")
    mask_picture = Image.fromarray((lower_half()[0].numpy() * 255).astype("uint8"), mode="L")
    mask_picture.save(tmp_path / "mask.png")
    kwargs = {"num_inference_steps": 4, "seed": 0}
    expected = pipe.generate(image=tensor, mask=lower_half(), **kwargs)
    for image, mask in ((picture, mask_picture), ([picture], [mask_picture]), (tmp_path / "in.png", str(tmp_path / "mask.png")),
                        (tensor[0], lower_half()[0]), (picture.convert("RGB"), mask_picture)):
        torch.testing.assert_close(pipe.generate(image=image, mask=mask, **kwargs), expected, rtol=0, atol=1e-6)


def test_images_of_another_size_are_resized_like_diffusers(pipe):
    big = images(1, size=56)
    loaded, sizes = editing.load_images(big, 1, (28, 28))
    assert sizes == [(56, 56)] and torch.equal(loaded, torch.nn.functional.interpolate(big, size=(28, 28)))
    picture = Image.fromarray((big[0, 0].numpy() * 255).astype("uint8"))
    pil_loaded, _ = editing.load_images(picture, 1, (28, 28))
    expected = torch.from_numpy(np.asarray(picture.resize((28, 28), Image.LANCZOS), dtype=np.float32)).flatten() / 255
    torch.testing.assert_close(pil_loaded.flatten(), expected)
    mask = torch.zeros(56, 56)
    mask[28:] = 1
    out = pipe.generate(image=big, mask=mask, num_inference_steps=2, seed=0)
    assert out.shape == (1, 1, 28, 28)


def test_a_soft_mask_is_binarized_at_one_half():
    soft = torch.full((1, 4, 4), 0.49)
    soft[:, 2:] = 0.5
    assert torch.equal(editing.load_mask(soft, [(4, 4)], (4, 4)),
                       torch.tensor([0.0, 0, 1, 1])[None, None, :, None].expand(1, 1, 4, 4))


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"strength": 1.5}, "strength must be a number in \\[0, 1\\]"),
    ({"strength": -0.1}, "strength must be a number in \\[0, 1\\]"),
    ({"strength": math.nan}, "strength must be a number in \\[0, 1\\]"),
    ({"strength": True}, "strength must be a number"),
    ({"mask": torch.ones(1, 20, 28)}, "the mask is 20×28 but image\\[0\\] is 28×28 \\(H×W\\): give a mask of the image's size"),
    ({"mask": torch.ones(2, 1, 28, 28) * 255}, "mask must have values in \\[0, 1\\], got \\[255, 255\\]: divide by 255"),
    ({"mask": torch.ones(3, 1, 28, 28)}, "got 3 masks for 2 images"),
    ({"mask": torch.ones(3, 28, 28)}, "mask must be \\[H, W\\], \\[1, H, W\\] or \\[B, 1, H, W\\]"),
    ({"image": torch.rand(2, 3, 28, 28)}, "image has 3 channels but the model makes 1-channel images"),
    ({"image": torch.rand(2, 1, 28, 28) * 2 - 1}, "image must have values in \\[0, 1\\].*\\(x \\+ 1\\) / 2"),
    ({"image": (torch.rand(2, 1, 28, 28) * 255).byte()}, "float tensor in \\[0, 1\\].*divide 8-bit values by 255"),
    ({"image": 3}, "image must be a tensor in \\[0, 1\\], a PIL image or a file path"),
    ({"image": "no/such.png"}, "cannot read 'no/such.png' as an image"),
    ({"class_labels": [1, 2, 3]}, "got 2 images but 3 class_labels: give one per image"),
    ({"num_images": 4}, "num_images=4 but 2 images were given"),
    ({"jump_n_sample": 2}, "jump_n_sample > 1 \\(RePaint resampling\\) needs mask="),
    ({"mask": lower_half(), "jump_length": 0}, "jump_length must be an integer >= 1"),
])
def test_bad_edit_arguments_are_value_errors_naming_the_fix(pipe, kwargs, message):
    kwargs = {"image": images(), "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe.generate(**kwargs)


@pytest.mark.parametrize("kwargs", [{"mask": lower_half()}, {"strength": 0.5}, {"jump_n_sample": 3}])
def test_edit_options_without_an_image_are_refused(pipe, kwargs):
    with pytest.raises(ValueError, match="needs image="):
        pipe.generate(2, num_inference_steps=2, **kwargs)


class _OneShotSampler:
    """A sampler with neither start_step nor the step-wise interface."""

    def __init__(self, schedule):
        self.schedule = schedule

    def sample(self, model_fn, shape, *, num_inference_steps=None, generator=None, latents=None, callback=None):
        return latents


class _Plugin:
    @minild.hookimpl
    def register_samplers(self, register):
        register("one_shot_for_editing", _OneShotSampler)


@pytest.fixture
def one_shot_sampler():
    name = minild.register_plugin(_Plugin(), name="one-shot-for-editing")
    try:
        yield "one_shot_for_editing"
    finally:
        minild.unregister_plugin(name)


def test_a_sampler_without_start_step_is_refused_for_img2img_and_without_step_for_inpainting(pipe, one_shot_sampler):
    with pytest.raises(ValueError, match="sampler 'one_shot_for_editing' cannot start from a noised image.*start_step"):
        pipe.generate(image=images(), sampler=one_shot_sampler, num_inference_steps=2)
    with pytest.raises(ValueError, match="sampler 'one_shot_for_editing' cannot inpaint: it has no timesteps or step"):
        pipe.generate(image=images(), mask=lower_half(), sampler=one_shot_sampler, num_inference_steps=2)


# -- the command line ------------------------------------------------------------------------


def test_sample_command_edits_an_image_file(pipe, tmp_path, capsys):
    run = tmp_path / "run"
    pipe.save_pretrained(run)
    picture = Image.fromarray((images(1)[0, 0].numpy() * 255).astype("uint8"), mode="L")
    picture.save(tmp_path / "in.png")
    Image.fromarray((lower_half()[0].numpy() * 255).astype("uint8"), mode="L").save(tmp_path / "mask.png")
    out = tmp_path / "edited.png"
    code = main(["sample", str(run), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--class-label", "3", "--num", "4", "--steps", "3", "--out", str(out)])
    assert code == 0 and out.exists()
    assert main(["sample", str(run), "--image", str(tmp_path / "in.png"), "--strength", "1.5"]) == 2
    assert "strength must be a number in [0, 1]" in capsys.readouterr().err
