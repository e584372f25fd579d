"""The SDXL prompt lab on a tiny random SDXL pipeline, offline, through the loading path users take."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minild import cli
from minild.lab.sdxl import LabError, load_sdxl, parse_size, read_prompts, run_sdxl_lab

from .browser import Chromium, find_chromium

PROMPTS = ["a red cube on a table", "a <b>blue</b> ball & a cat"]
GUIDANCE = [1.0, 5.0]
SEEDS = [0, 1, 2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py


@pytest.fixture(scope="module")
def lab_dir(tiny_sdxl_dir, tmp_path_factory):
    """One CLI run: 2 prompts (from a file) × 2 guidance scales × 3 seeds, 2 steps, 64×64, offline."""
    out = tmp_path_factory.mktemp("lab")
    prompts_file = out.parent / "prompts.txt"
    prompts_file.write_text("# two prompts\n" + "\n\n".join(PROMPTS) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        code = cli.main([
            "lab", "sdxl", "--model", str(tiny_sdxl_dir), "--prompts", str(prompts_file), "--negative", "blurry",
            "--guidance", "1,5", "--steps", "2", "--seeds", "0,1,2", "--scheduler", "minild:ddim:eta=1",
            "--batch-size", "2", "--out", str(out),
        ])
    torch.set_num_threads(threads)
    assert code == 0
    return out


def results(lab_dir):
    return json.loads((lab_dir / "results.json").read_text())


# --- The files a run writes -------------------------------------------------------------------


def test_lab_writes_one_png_per_prompt_guidance_and_seed(lab_dir):
    rows = results(lab_dir)["images"]
    cells = {(row["prompt"], row["guidance_scale"], row["seed"]) for row in rows}
    assert cells == {(p, g, s) for p in PROMPTS for g in GUIDANCE for s in SEEDS} and len(rows) == 12
    for row in rows:
        with Image.open(lab_dir / row["path"]) as image:
            assert image.format == "PNG" and image.size == (64, 64)
    assert len(list(lab_dir.glob("images/*/*.png"))) == 12


def test_png_text_metadata_holds_the_parameters(lab_dir):
    row = next(r for r in results(lab_dir)["images"] if r["seed"] == 2 and r["guidance_scale"] == 5.0)
    with Image.open(lab_dir / row["path"]) as image:
        text = image.text
    parameters = json.loads(text["parameters"])
    assert parameters == row
    assert (text["prompt"], text["seed"], text["guidance_scale"]) == (row["prompt"], "2", "5.0")
    assert (text["num_inference_steps"], text["scheduler"], text["negative_prompt"]) == ("2", "minild:ddim:eta=1", "blurry")


def test_results_json_lists_settings_grids_and_images(lab_dir):
    table = results(lab_dir)
    settings = table["settings"]
    assert settings["prompts"] == PROMPTS and settings["seeds"] == SEEDS and settings["guidance_scales"] == GUIDANCE
    assert settings["scheduler_class"] == "MinildScheduler" and settings["device"] == "cpu"
    assert [grid["prompt"] for grid in table["grids"]] == PROMPTS
    assert all((lab_dir / grid["path"]).is_file() for grid in table["grids"])


def test_contact_sheet_rows_are_seeds_and_columns_are_guidance(lab_dir):
    table = results(lab_dir)
    with Image.open(lab_dir / table["grids"][1]["path"]) as sheet:
        sheet = np.asarray(sheet.convert("RGB"))
    label_width, label_height, pad = 64, 16, 2
    assert sheet.shape == (label_height + 3 * (64 + pad), label_width + 2 * (64 + pad), 3)
    for row in (r for r in table["images"] if r["prompt_index"] == 1):
        top = label_height + SEEDS.index(row["seed"]) * (64 + pad)
        left = label_width + GUIDANCE.index(row["guidance_scale"]) * (64 + pad)
        with Image.open(lab_dir / row["path"]) as image:
            assert np.array_equal(sheet[top:top + 64, left:left + 64], np.asarray(image.convert("RGB")))


def test_index_html_shows_every_image_with_its_parameters(lab_dir):
    page = (lab_dir / "index.html").read_text()
    for row in results(lab_dir)["images"]:
        assert f'src="{row["path"]}"' in page
    assert "a &lt;b&gt;blue&lt;/b&gt; ball &amp; a cat" in page and "<b>blue</b>" not in page  # escaped
    assert "seed 2 · guidance 5 · 2 steps" in page
    assert 'id="prompt-filter"' in page and "http" not in page.replace("http-equiv", "")  # self-contained


# --- The gallery in a real browser ------------------------------------------------------------

chromium = pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH (apt-get install chromium)")

IMAGE_REPORT = """
Promise.all(Array.from(document.images, image => image.decode().catch(() => null))).then(() =>
  Array.from(document.images, image => ({src: image.getAttribute("src"), naturalWidth: image.naturalWidth})))
"""

VISIBLE_PROMPTS = """
(() => {
  const select = document.getElementById("prompt-filter");
  select.value = "%s";
  select.dispatchEvent(new Event("change"));
  const shown = Array.from(document.querySelectorAll("figure")).filter(figure => figure.offsetParent !== null);
  return {prompts: [...new Set(shown.map(figure => figure.closest("section").dataset.prompt))],
          figures: shown.length, count: document.getElementById("shown-count").textContent};
})()
"""


@chromium
def test_gallery_images_all_decode_in_headless_chromium(lab_dir):
    rows = results(lab_dir)["images"]
    with Chromium(find_chromium()) as browser:
        session = browser.open(lab_dir / "index.html")
        report = browser.evaluate(session, IMAGE_REPORT)
    sources = [image["src"] for image in report]
    assert set(sources) == {row["path"] for row in rows} | {grid["path"] for grid in results(lab_dir)["grids"]}
    assert [image["src"] for image in report if image["naturalWidth"] <= 0] == []


@chromium
def test_gallery_filters_by_prompt_in_headless_chromium(lab_dir):
    with Chromium(find_chromium()) as browser:
        session = browser.open(lab_dir / "index.html")
        second = browser.evaluate(session, VISIBLE_PROMPTS % "1")
        everything = browser.evaluate(session, VISIBLE_PROMPTS % "all")
    assert second == {"prompts": [PROMPTS[1]], "figures": 6, "count": "6 of 12 images"}
    assert everything["prompts"] == PROMPTS and everything["figures"] == 12


# --- The Python API ---------------------------------------------------------------------------


def test_python_api_returns_pil_images_and_rows_without_writing(tiny_sdxl_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lab = run_sdxl_lab(tiny_sdxl_dir, "a red cube", guidance_scales=[3.0], seeds=[4, 5], num_inference_steps=2)
    assert [type(image.image) for image in lab.images] == [Image.Image, Image.Image]
    assert [row["seed"] for row in lab.rows] == [4, 5] and all(row["path"] is None for row in lab.rows)
    assert lab.grids["a red cube"].size == (64 + 66, 16 + 2 * 66)
    assert list(tmp_path.iterdir()) == []


def test_each_image_depends_on_its_seed_not_its_batch(tiny_sdxl_dir):
    pipe = load_sdxl(tiny_sdxl_dir)
    common = dict(guidance_scales=[5.0], num_inference_steps=2, pipe=pipe)
    alone = run_sdxl_lab(tiny_sdxl_dir, "a cube", seeds=[7], **common).images[0].image
    batched = run_sdxl_lab(tiny_sdxl_dir, "a cube", seeds=[6, 7, 8], batch_size=3, **common).images[1].image
    other = run_sdxl_lab(tiny_sdxl_dir, "a cube", seeds=[8], **common).images[0].image
    difference = np.abs(np.asarray(alone, dtype=int) - np.asarray(batched, dtype=int)).max()
    assert difference <= 1  # batched convolutions may round differently by one level
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(other, dtype=int)).max() > 10


@pytest.mark.parametrize("scheduler", ["euler", "dpm++2m"])
def test_diffusers_schedulers_run_by_name(tiny_sdxl_dir, scheduler):
    pipe = load_sdxl(tiny_sdxl_dir)
    lab = run_sdxl_lab(tiny_sdxl_dir, "a cube", seeds=[0], num_inference_steps=2, scheduler=scheduler, pipe=pipe)
    assert lab.settings["scheduler"] == scheduler
    assert lab.settings["scheduler_class"] == {"euler": "EulerDiscreteScheduler",
                                               "dpm++2m": "DPMSolverMultistepScheduler"}[scheduler]
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # the reused pipe keeps its own



@pytest.fixture(scope="module")
def tiny_refiner_dir(tiny_sdxl_dir, tmp_path_factory):
    """SDXL's refiner layout: no first text encoder, the base's second encoder and VAE, and a UNet that
    attends to the second encoder alone (32-d) with an aesthetic score among its 5 time ids (5 × 8 + 32)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    base = load_sdxl(tiny_sdxl_dir)
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config(base.unet.config, cross_attention_dim=32,
                                            projection_class_embeddings_input_dim=72)
    directory = tmp_path_factory.mktemp("tiny_refiner")
    StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler, requires_aesthetics_score=True,
    ).save_pretrained(directory)
    return directory


def test_refiner_finishes_what_the_base_model_started(tiny_sdxl_dir, tiny_refiner_dir):
    common = dict(seeds=[0], guidance_scales=[5.0], num_inference_steps=4, pipe=load_sdxl(tiny_sdxl_dir))
    plain = run_sdxl_lab(tiny_sdxl_dir, "a cube", **common).images[0]
    refined = run_sdxl_lab(tiny_sdxl_dir, "a cube", refiner=tiny_refiner_dir, refiner_start=0.5, **common).images[0]
    assert refined.refiner == str(tiny_refiner_dir) and refined.image.size == (64, 64)
    assert np.abs(np.asarray(plain.image, dtype=int) - np.asarray(refined.image, dtype=int)).max() > 0


@pytest.mark.parametrize("ours_name, theirs_name", [
    ("minild:ddim", "ddim"), ("minild:ddpm", "ddpm"), ("minild:dpm_solver_pp", "dpm++2m"),
])
def test_minild_samplers_hand_over_to_the_refiner_like_their_diffusers_counterparts(
    tiny_sdxl_dir, tiny_refiner_dir, ours_name, theirs_name
):
    # The base stops half-way through the chain and the refiner starts there (set_begin_index).
    common = dict(seeds=[0, 1], guidance_scales=[5.0], num_inference_steps=4, refiner=tiny_refiner_dir,
                  refiner_start=0.5)
    ours = run_sdxl_lab(tiny_sdxl_dir, "a cube", scheduler=ours_name, **common).images
    theirs = run_sdxl_lab(tiny_sdxl_dir, "a cube", scheduler=theirs_name, **common).images
    for a, b in zip(ours, theirs):
        assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= 1


# --- Errors -----------------------------------------------------------------------------------


def test_missing_model_error_names_every_attempt(tmp_path, offline, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LabError) as error:
        load_sdxl("nobody/no-such-sdxl")
    message = str(error.value)
    assert "could not load the SDXL model 'nobody/no-such-sdxl'" in message
    assert f"local directory {tmp_path / 'nobody/no-such-sdxl'} (does not exist)" in message
    assert "hub id 'nobody/no-such-sdxl'" in message


def test_cli_reports_a_missing_model_in_one_line(tmp_path, offline, capsys):
    code = cli.main(["lab", "sdxl", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("minild: error: could not load the SDXL model") and "\n" not in error


def test_cli_refuses_an_unknown_sampler_option_before_loading_in_one_line(tmp_path, capsys):
    code = cli.main(["lab", "sdxl", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path),
                     "--scheduler", "minild:ddim:etaa=1"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "minild sampler 'ddim' has no option 'etaa'; its options: eta, clip_sample" in error and "\n" not in error


def test_a_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    with pytest.raises(LabError, match="no model_index.json"):
        load_sdxl(tmp_path)


def test_weights_must_be_safetensors(tiny_sdxl_dir, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_sdxl_dir, tmp_path / "pickled")
    for weights in copy.glob("unet/*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(LabError, match="could not load"):
        load_sdxl(copy)


def test_float16_loads_the_fp16_variant_when_the_model_has_one(tiny_sdxl_dir, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_sdxl_dir, tmp_path / "with-variant")
    pipe = load_sdxl(copy, device="cpu")
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(0.5)  # marks the variant's weights
    pipe.save_pretrained(copy, variant="fp16")  # *.fp16.safetensors beside the default weights
    with_variant = load_sdxl(copy, device="cpu", dtype="float16")
    assert with_variant.unet.dtype == torch.float16 and bool((with_variant.unet.conv_out.bias == 0.5).all())
    without = load_sdxl(tiny_sdxl_dir, device="cpu", dtype="float16")  # falls back to the default weights, cast
    assert without.unet.dtype == torch.float16 and not bool((without.unet.conv_out.bias == 0.5).all())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: parse_size("big"), "WIDTHxHEIGHT"),
        (lambda: parse_size("100x64"), "multiples of 8"),
        (lambda: load_sdxl("x", memory=["turbo"]), "unknown memory option"),
        (lambda: load_sdxl("x", device="cpu", memory=["model_cpu_offload"]), "the device is cpu"),
        (lambda: load_sdxl("x", dtype="float8"), "dtype"),
        (lambda: run_sdxl_lab("x", []), "prompt"),
        (lambda: run_sdxl_lab("x", "p", seeds=[1, 1]), "must not repeat"),
        (lambda: run_sdxl_lab("x", "p", seeds=[0, -1]), r"every seed must lie in \[0, 2\*\*64\), got -1"),
        (lambda: run_sdxl_lab("x", "p", num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_bad_options_are_explained(call, message):
    with pytest.raises(LabError, match=message):
        call()


def test_prompts_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\n  a cat  \na dog\n")
    assert read_prompts(path) == ["a cat", "a dog"]
    path.write_text("# only a comment\n")
    with pytest.raises(LabError, match="holds no prompts"):
        read_prompts(path)
