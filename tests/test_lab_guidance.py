"""Guidance methods in the SDXL prompt lab, on the tiny SDXL: cfg_rescale is diffusers'
guidance_rescale; cfg_interval is plain CFG when every step lies in the interval and the
conditional model alone when none does."""

import numpy as np
import pytest
import torch

from minild.lab.sdxl import load_sdxl, run_sdxl_lab
from minild.lab.guidance import LabGuidanceError, applied, parse_guidance_method

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    return load_sdxl(tiny_sdxl_dir)


def images(tiny_sdxl_dir, pipe, guidance_scale, method="cfg"):
    lab = run_sdxl_lab(tiny_sdxl_dir, "a red cube", guidance_scales=[guidance_scale], seeds=[0, 1],
                       num_inference_steps=3, guidance_method=method, pipe=pipe)
    assert lab.settings["guidance_method"] == method
    return np.stack([np.asarray(image.image, dtype=int) for image in lab.images])


def test_cfg_rescale_is_diffusers_guidance_rescale(tiny_sdxl_dir, pipe):
    plain = images(tiny_sdxl_dir, pipe, 7.0)
    rescaled = images(tiny_sdxl_dir, pipe, 7.0, "cfg_rescale:phi=0.7")
    pipe_kwargs = dict(prompt=["a red cube"] * 2, guidance_scale=7.0, num_inference_steps=3, guidance_rescale=0.7)
    direct = pipe(**pipe_kwargs, generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert np.abs(rescaled - np.stack([np.asarray(im, dtype=int) for im in direct])).max() == 0
    assert np.abs(rescaled - plain).max() > 0


def test_cfg_interval_is_cfg_inside_and_the_conditional_model_outside(tiny_sdxl_dir, pipe):
    everywhere = images(tiny_sdxl_dir, pipe, 5.0, "cfg_interval:sigma_low=0,sigma_high=inf")
    assert np.abs(everywhere - images(tiny_sdxl_dir, pipe, 5.0)).max() == 0
    nowhere = images(tiny_sdxl_dir, pipe, 5.0, "cfg_interval:sigma_low=100,sigma_high=200")
    assert np.abs(nowhere - images(tiny_sdxl_dir, pipe, 1.0)).max() <= 1  # uint8 rounding of batch-size noise
    assert "forward" not in vars(pipe.unet)  # the UNet's own forward is back


def test_minild_stages_through_the_unet_wrapper_match_diffusers_own_guidance(tiny_sdxl_dir, pipe):
    # The wrapper hands the pipeline ε̃ for both halves, so its CFG mix is ε̃: minild's cfg stage
    # must then give diffusers' own CFG, and its cfg_rescale diffusers' guidance_rescale.
    assert np.abs(images(tiny_sdxl_dir, pipe, 5.0, "minild:cfg") - images(tiny_sdxl_dir, pipe, 5.0)).max() <= 1
    rescaled = images(tiny_sdxl_dir, pipe, 7.0, "minild:cfg_rescale:phi=0.7")
    assert np.abs(rescaled - images(tiny_sdxl_dir, pipe, 7.0, "cfg_rescale:phi=0.7")).max() <= 1
    assert "forward" not in vars(pipe.unet)


def test_apg_reaches_the_lab_with_its_state_reset_for_every_pipeline_call(tiny_sdxl_dir, pipe):
    apg = images(tiny_sdxl_dir, pipe, 5.0, "minild:apg:momentum=-0.5")
    assert np.abs(apg - images(tiny_sdxl_dir, pipe, 5.0)).max() > 0  # not plain CFG
    # APG's momentum belongs to one sampling run: a call after another starts from none.
    method = "minild:apg:momentum=-0.9,norm_threshold=0"

    def latents(seed):
        return pipe(prompt=["a red cube"], guidance_scale=5.0, num_inference_steps=4, output_type="latent",
                    generator=torch.Generator().manual_seed(seed)).images

    with applied([pipe], method):
        fresh = latents(1)
    with applied([pipe], method):
        latents(0)
        after_another = latents(1)
    torch.testing.assert_close(after_another, fresh)


@pytest.mark.parametrize("name, message", [
    ("pag", "unknown guidance method 'pag'; choose one of: cfg, cfg_rescale, cfg_interval"),
    ("cfg_rescale:rho=1", "'cfg_rescale' has no option 'rho'; its options: phi"),
    ("cfg_rescale:phi=2", "phi must lie in \\[0, 1\\]"),
    ("cfg_interval:sigma_low=3,sigma_high=1", "sigma_low < sigma_high"),
    ("cfg_rescale:phi=abc", "cfg_rescale phi must be a finite number"),
    ("apg", "or any guidance stage as minild:<name> \\(apg, cfg, cfg_interval, cfg_rescale\\)"),
    ("minild:pag", "unknown guidance stage 'pag' in 'minild:pag'; available: apg, cfg"),
    ("minild:apg:momentum=3", "apg momentum must lie in \\(-1, 1\\)"),
    ("minild:apg:scale=2", "the lab sets the guidance scale from its guidance scales"),
    ("minild:apg:rho=1", "unknown key guidance.rho; guidance accepts: scale, momentum, norm_threshold, eta"),
])
def test_bad_guidance_methods_are_errors_naming_the_choices(name, message):
    with pytest.raises(LabGuidanceError, match=message):
        parse_guidance_method(name)
    assert parse_guidance_method("cfg_interval:sigma_high=inf") == ("cfg_interval", {"sigma_low": 0.28,
                                                                                     "sigma_high": float("inf")})
