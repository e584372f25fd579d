"""Editing in the SDXL prompt lab (img2img and inpainting) on tiny random SDXL pipelines, offline."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from minild import cli
from minild.lab.sdxl import load_sdxl, run_sdxl_lab
from minild.lab.editing import NOTE_4_CHANNEL_INPAINT, EditError
from minild.lab.tiny_sdxl import build_tiny_sdxl

from .test_lab import tiny_refiner_dir  # noqa: F401  (a fixture: SDXL's refiner layout)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=int)


def most_different(a, b):
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture(scope="module")
def tiny_inpainting_dir(tmp_path_factory):
    """The tiny SDXL with a 9-channel UNet (latents, mask, masked-image latents): an inpainting model."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_inpainting"), inpainting=True)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 64×64 RGB picture and its mask (a white square: regenerate it), and an 80×96 picture."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    smooth = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1) + rng.integers(0, 8, (64, 64, 3))
    Image.fromarray(smooth.astype(np.uint8)).save(folder / "image.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask, "L").save(folder / "mask.png")
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    Image.fromarray(np.zeros((80, 96), np.uint8), "L").save(folder / "black-wide.png")
    (folder / "notes.png").write_text("not a picture")
    return folder


def run_cli(out, *arguments, prompts=("--prompt", "a red cube")):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return cli.main(["lab", "sdxl", *prompts, "--guidance", "1,5", "--steps", "4", "--seeds", "0,1",
                         "--scheduler", "minild:ddim", "--out", str(out), *arguments])


@pytest.fixture(scope="module")
def img2img_dir(tiny_sdxl_dir, pictures, tmp_path_factory):
    out = tmp_path_factory.mktemp("img2img")
    prompts = out.parent / "img2img-prompts.txt"
    prompts.write_text("# two prompts\na red cube\na blue ball\n")
    assert run_cli(out, "--model", str(tiny_sdxl_dir), "--image", str(pictures / "image.png"), "--strength", "0.5",
                   "--memory", "vae_slicing,attention_slicing", prompts=("--prompts", str(prompts))) == 0
    return out


@pytest.fixture(scope="module")
def inpaint_dir(tiny_inpainting_dir, pictures, tmp_path_factory):
    out = tmp_path_factory.mktemp("inpaint")
    assert run_cli(out, "--model", str(tiny_inpainting_dir), "--image", str(pictures / "image.png"),
                   "--mask", str(pictures / "mask.png"), "--strength", "0.75") == 0
    return out


def table(out):
    return json.loads((out / "results.json").read_text())


# --- The command line: files, contact sheets, gallery -------------------------------------------


def test_img2img_through_the_cli_records_the_edit(img2img_dir, pictures):
    results = table(img2img_dir)
    settings = results["settings"]
    assert (settings["task"], settings["strength"], settings["pipeline_class"]) == (
        "img2img", 0.5, "StableDiffusionXLImg2ImgPipeline")
    assert settings["init_image"] == str(pictures / "image.png") and settings["mask_image"] is None
    assert results["inputs"] == {"input": "inputs/image.png"} and settings["prompts"] == ["a red cube", "a blue ball"]
    assert len(results["images"]) == 8 and all(row["task"] == "img2img" for row in results["images"])
    for grid in results["grids"]:  # input | guidance 1 | guidance 5, a row per seed
        with Image.open(img2img_dir / grid["path"]) as sheet:
            assert sheet.size == (64 + 3 * 66, 16 + 2 * 66)
    with Image.open(img2img_dir / results["images"][0]["path"]) as image:
        assert json.loads(image.text["parameters"])["strength"] == 0.5


def test_inpaint_through_the_cli_writes_input_and_mask(inpaint_dir, pictures):
    results = table(inpaint_dir)
    assert results["settings"]["task"] == "inpaint" and results["settings"]["notes"] == []
    assert results["settings"]["pipeline_class"] == "StableDiffusionXLInpaintPipeline"
    assert results["inputs"] == {"input": "inputs/image.png", "mask": "inputs/mask.png"}
    with Image.open(inpaint_dir / "inputs/mask.png") as mask, Image.open(pictures / "mask.png") as original:
        assert mask.mode == "L" and np.array_equal(np.asarray(mask), np.asarray(original))


def test_contact_sheet_rows_read_input_mask_then_outputs(inpaint_dir):
    results = table(inpaint_dir)
    with Image.open(inpaint_dir / results["grids"][0]["path"]) as sheet:
        sheet = pixels(sheet)
    label_width, label_height, pad, side = 64, 16, 2, 64
    assert sheet.shape == (label_height + 2 * (side + pad), label_width + 4 * (side + pad), 3)

    def cell(row, column):
        top, left = label_height + row * (side + pad), label_width + column * (side + pad)
        return sheet[top:top + side, left:left + side]

    for row in range(2):
        for column, name in enumerate(["image", "mask"]):
            with Image.open(inpaint_dir / f"inputs/{name}.png") as picture:
                assert np.array_equal(cell(row, column), pixels(picture))
    for image in results["images"]:
        with Image.open(inpaint_dir / image["path"]) as output:
            column = 2 + [1.0, 5.0].index(image["guidance_scale"])
            assert np.array_equal(cell([0, 1].index(image["seed"]), column), pixels(output))


def test_gallery_shows_input_and_mask_before_each_prompts_outputs(inpaint_dir, img2img_dir):
    page = (inpaint_dir / "index.html").read_text()
    section = page[page.index("<section"):page.index("</section>")]
    order = [section.index(f'src="{path}"') for path in ["inputs/image.png", "inputs/mask.png"]]
    order += [section.index(f'src="{row["path"]}"') for row in table(inpaint_dir)["images"]]
    assert order[:2] == sorted(order[:2]) and max(order[:2]) < min(order[2:])
    assert "input image" in section and "mask (white = regenerated)" in section
    assert "inpaint of <code>" in page and "strength 0.75" in page
    assert 'querySelectorAll("figure[data-seed]")' in page  # the image count leaves the inputs out
    img2img_page = (img2img_dir / "index.html").read_text()
    assert 'src="inputs/image.png"' in img2img_page and "inputs/mask.png" not in img2img_page


def test_a_plain_unet_inpaints_with_a_printed_note(tiny_sdxl_dir, pictures, tmp_path, capsys):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_models = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_models.addHandler(handler)
    try:
        assert run_cli(tmp_path, "--model", str(tiny_sdxl_dir), "--image", str(pictures / "image.png"),
                       "--mask", str(pictures / "mask.png")) == 0
    finally:
        diffusers_models.removeHandler(handler)
    assert f"note: {NOTE_4_CHANNEL_INPAINT}" in capsys.readouterr().out.splitlines()
    # diffusers warns at from_pipe's casts and the VAE's float32 upcast in every call; the lab silences that
    assert [r.getMessage() for r in records if "kept in float32" in r.getMessage()] == []
    assert table(tmp_path)["settings"]["notes"] == [NOTE_4_CHANNEL_INPAINT]
    assert table(tmp_path)["settings"]["strength"] == 1.0  # the default with a mask
    assert NOTE_4_CHANNEL_INPAINT.replace("'", "&#x27;") in (tmp_path / "index.html").read_text()


# --- The Python API against diffusers' own pipelines ------------------------------------------


def diffusers_ddim(pipeline_class, model, seeds, **call):
    from diffusers import DDIMScheduler

    pipe = pipeline_class.from_pretrained(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with torch.no_grad():
        return pipe(prompt=["a red cube"] * len(seeds), generator=generators, **call).images


def test_img2img_with_minild_ddim_equals_diffusers_ddim_pipeline(tiny_sdxl_dir, pictures):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    ours = run_sdxl_lab(tiny_sdxl_dir, "a red cube", seeds=[0, 1], guidance_scales=[5.0], num_inference_steps=5,
                        scheduler="minild:ddim", image=pictures / "image.png", strength=0.6).images
    with Image.open(pictures / "image.png") as image:
        theirs = diffusers_ddim(StableDiffusionXLImg2ImgPipeline, tiny_sdxl_dir, [0, 1], image=image.convert("RGB"),
                                strength=0.6, num_inference_steps=5, guidance_scale=5.0)
    assert [most_different(a.image, b) <= 1 for a, b in zip(ours, theirs)] == [True, True]


@pytest.mark.parametrize("inpainting_unet", [True, False], ids=["9-channel", "4-channel"])
def test_inpaint_with_minild_ddim_equals_diffusers_ddim_pipeline(tiny_sdxl_dir, tiny_inpainting_dir, pictures,
                                                                 inpainting_unet):
    from diffusers import StableDiffusionXLInpaintPipeline

    model = tiny_inpainting_dir if inpainting_unet else tiny_sdxl_dir
    ours = run_sdxl_lab(model, "a red cube", seeds=[3], guidance_scales=[5.0], num_inference_steps=4,
                        scheduler="minild:ddim", image=pictures / "image.png", mask=pictures / "mask.png",
                        strength=0.75).images
    with Image.open(pictures / "image.png") as image, Image.open(pictures / "mask.png") as mask:
        theirs = diffusers_ddim(StableDiffusionXLInpaintPipeline, model, [3], image=image.convert("RGB"),
                                mask_image=mask, strength=0.75, num_inference_steps=4, guidance_scale=5.0,
                                width=64, height=64)
    assert most_different(ours[0].image, theirs[0]) <= 1


@pytest.mark.parametrize("strength, steps", [(0.35, 3), (0.6, 6), (1.0, 10)])
def test_strength_runs_int_steps_times_strength_steps(tiny_sdxl_dir, pictures, strength, steps):
    pipe = load_sdxl(tiny_sdxl_dir)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        run_sdxl_lab(tiny_sdxl_dir, "a cube", seeds=[0], guidance_scales=[1.0], num_inference_steps=10,
                     image=pictures / "image.png", strength=strength, scheduler="minild:ddim", pipe=pipe)
    finally:
        hook.remove()
    assert len(calls) == steps == int(10 * strength)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"  # the editing pipeline was made beside it


def test_an_all_black_mask_keeps_everything_with_a_plain_unet_but_not_with_an_inpainting_one(
    tiny_sdxl_dir, tiny_inpainting_dir, pictures, tmp_path
):
    # A 4-channel UNet's pipeline puts the original latents back outside the mask after every step:
    # with nothing to regenerate the prompt cannot matter. A 9-channel UNet keeps only what it learnt to.
    black = tmp_path / "black.png"
    Image.new("L", (64, 64), 0).save(black)

    def two_prompts(model):
        return [run_sdxl_lab(model, prompt, seeds=[0], guidance_scales=[5.0], num_inference_steps=3,
                             image=pictures / "image.png", mask=black).images[0].image
                for prompt in ("a red cube", "a green forest")]

    assert most_different(*two_prompts(tiny_sdxl_dir)) == 0
    assert most_different(*two_prompts(tiny_inpainting_dir)) > 10


def test_lab_options_still_work_when_editing(tiny_sdxl_dir, tiny_inpainting_dir, pictures):
    image, mask = pictures / "image.png", pictures / "mask.png"
    common = dict(seeds=[0], guidance_scales=[5.0], num_inference_steps=4)
    cfg = run_sdxl_lab(tiny_inpainting_dir, "a cube", image=image, mask=mask, **common).images[0].image
    apg = run_sdxl_lab(tiny_inpainting_dir, "a cube", image=image, mask=mask, guidance_method="minild:apg",
                       **common).images[0].image
    assert most_different(cfg, apg) > 0  # the guidance stage reads x_t from the 9-channel input's first 4
    for scheduler, method in [("euler", "cfg_rescale"), ("dpm++2m", "cfg_interval")]:
        lab = run_sdxl_lab(tiny_sdxl_dir, "a cube", image=image, scheduler=scheduler, guidance_method=method,
                           negative_prompt="blurry", batch_size=1, **{**common, "seeds": [0, 1]})
        assert [im.image.size for im in lab.images] == [(64, 64)] * 2


def test_img2img_hands_over_to_the_refiner(tiny_sdxl_dir, tiny_refiner_dir, pictures):  # noqa: F811
    common = dict(seeds=[0], guidance_scales=[5.0], num_inference_steps=4, image=pictures / "image.png",
                  strength=0.75, scheduler="minild:ddim")
    plain = run_sdxl_lab(tiny_sdxl_dir, "a cube", **common).images[0]
    refined = run_sdxl_lab(tiny_sdxl_dir, "a cube", refiner=tiny_refiner_dir, refiner_start=0.5, **common).images[0]
    assert refined.refiner == str(tiny_refiner_dir) and most_different(plain.image, refined.image) > 0
    # The base starts at 1 − strength, stops at refiner_start, and the refiner resumes there (set_begin_index).
    theirs = run_sdxl_lab(tiny_sdxl_dir, "a cube", refiner=tiny_refiner_dir, refiner_start=0.5,
                          **{**common, "scheduler": "ddim"}).images[0]
    assert most_different(refined.image, theirs.image) <= 1


def test_images_are_stretched_to_the_lab_size_with_lanczos(tiny_sdxl_dir, pictures):
    lab = run_sdxl_lab(tiny_sdxl_dir, "a cube", seeds=[0], num_inference_steps=2, image=pictures / "wide.jpg",
                       mask=pictures / "black-wide.png")
    with Image.open(pictures / "wide.jpg") as wide:
        expected = wide.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(pixels(lab.inputs.image), pixels(expected)) and lab.inputs.mask.size == (64, 64)
    assert lab.images[0].image.size == (64, 64)


# --- Errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "0.5"])
def test_strength_outside_zero_to_one_is_refused(pictures, strength):
    with pytest.raises(EditError, match=r"strength must be a number in \[0, 1\]"):
        run_sdxl_lab("unused", "p", image=pictures / "image.png", strength=strength)


@pytest.mark.parametrize("strength, steps, fix", [(0.0, 30, "raise --strength above 0"),
                                                  (0.2, 4, "raise --steps to at least 5")])
def test_a_strength_that_leaves_no_step_names_the_fix(pictures, strength, steps, fix):
    with pytest.raises(EditError, match=fix):
        run_sdxl_lab("unused", "p", image=pictures / "image.png", strength=strength, num_inference_steps=steps)


@pytest.mark.parametrize("arguments, message", [
    (dict(mask="mask.png"), "a mask needs the image it masks"),
    (dict(strength=0.5), "pass --image IMG with it"),
    (dict(image="missing.png"), "image file .*missing.png does not exist"),
    (dict(image="notes.png"), "image file .*notes.png is not an image PIL can read"),
    (dict(image="image.png", mask="notes.png"), "mask file .*notes.png is not an image"),
    (dict(image="image.png", mask="black-wide.png"), "is 96x80 but image .* is 64x64; draw the mask"),
    (dict(image="image.png", mask="mask.png", refiner="unused"), "--refiner does not combine with --mask"),
    (dict(image="image.png", strength=0.3, refiner="unused", refiner_start=0.6), "raise strength above 0.4"),
])
def test_bad_edit_inputs_are_refused_before_loading(pictures, arguments, message):
    arguments = {key: pictures / value if key in ("image", "mask") else value for key, value in arguments.items()}
    with pytest.raises(EditError, match=message):
        run_sdxl_lab("nothing/loads-this", "p", **arguments)


def test_an_inpainting_unet_without_a_mask_is_refused(tiny_inpainting_dir, pictures):
    with pytest.raises(EditError, match="an inpainting UNet: add --mask MASK"):
        run_sdxl_lab(tiny_inpainting_dir, "p", image=pictures / "image.png", num_inference_steps=2)
    with pytest.raises(EditError, match=r"give it an image and a mask"):
        run_sdxl_lab(tiny_inpainting_dir, "p", num_inference_steps=2)


def test_cli_reports_a_bad_edit_in_one_line(tmp_path, pictures, capsys):
    assert issubclass(EditError, ValueError)  # what the command line reports in one line
    code = run_cli(tmp_path, "--model", "unused", "--mask", str(pictures / "mask.png"))
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("minild: error: a mask needs the image it masks") and "\n" not in error


def test_the_editing_pipeline_keeps_the_loaded_dtype_and_model_offload(tiny_sdxl_dir, pictures):
    # from_pipe casts every shared module, to float32 unless given the pipeline's dtype.
    half = load_sdxl(tiny_sdxl_dir, device="cpu", dtype="bfloat16")
    lab = run_sdxl_lab(tiny_sdxl_dir, "a cube", seeds=[0], num_inference_steps=2, image=pictures / "image.png",
                       pipe=half)
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder_2.dtype} == {torch.bfloat16}
    assert lab.settings["dtype"] == "torch.bfloat16"
    # Model CPU offload's hooks sit on the shared modules, so the editing pipeline offloads too
    # (CPU to CPU here: the pixels must not change).
    common = dict(seeds=[0], num_inference_steps=2, image=pictures / "image.png", mask=pictures / "mask.png")
    plain = run_sdxl_lab(tiny_sdxl_dir, "a cube", **common).images[0].image
    offloaded = load_sdxl(tiny_sdxl_dir, device="cpu")
    offloaded.enable_model_cpu_offload(device="cpu")
    assert most_different(plain, run_sdxl_lab(tiny_sdxl_dir, "a cube", pipe=offloaded, **common).images[0].image) == 0
    assert hasattr(offloaded.unet, "_hf_hook")
