"""The SDXL prompt lab: every prompt × guidance scale × seed through a diffusers SDXL pipeline,
written as PNGs with their parameters, one contact sheet per prompt, ``results.json`` and ``index.html``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from minild.devices import resolve_device
from minild.lab.editing import DTYPE_KEYWORD, edit_settings, editing_pipelines, quiet_dtype_casts, read_edit_inputs, write_inputs
from minild.lab.gallery import contact_sheet, write_gallery
from minild.lab.guidance import applied, parse_guidance_method
from minild.lab.scheduler_adapter import check_scheduler_name, make_scheduler
from minild.pipeline.generation import check_seed

MEMORY_OPTIONS = ("model_cpu_offload", "vae_slicing", "vae_tiling", "attention_slicing")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class LabError(ValueError):
    """The lab cannot run as asked: a model that does not load, a bad option, a bad prompts file."""


@dataclass
class LabImage:
    """One generated image and everything needed to make it again."""

    prompt: str
    prompt_index: int
    negative_prompt: str | None
    seed: int
    guidance_scale: float
    num_inference_steps: int
    scheduler: str
    width: int
    height: int
    model: str
    refiner: str | None
    seconds: float  # this image's share of its batch's generation time
    task: str = "text2img"  # or "img2img", "inpaint"
    init_image: str | None = None  # the edited image's path, and the mask's
    mask_image: str | None = None
    strength: float | None = None
    path: str | None = None  # relative to the output folder, when one was written
    image: Image.Image | None = field(default=None, repr=False)

    def parameters(self) -> dict[str, Any]:
        """The row of ``results.json`` and the PNG's metadata: plain data, no pixels."""
        row = asdict(self)
        del row["image"]
        return row


@dataclass
class LabResults:
    """What a lab run made: ``images`` (PIL images + parameters), one contact sheet per prompt."""

    images: list[LabImage]
    grids: dict[str, Image.Image]  # prompt → contact sheet (rows = seeds, columns = guidance scales)
    settings: dict[str, Any]
    out_dir: Path | None = None
    inputs: Any = None  # the edit's minild.lab.editing.EditInputs, None for text-to-image

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One dict per image (the ``results.json`` table; ``pandas.DataFrame(results.rows)`` works)."""
        return [image.parameters() for image in self.images]


# --- Loading ----------------------------------------------------------------------------------


def load_sdxl(model: str | Path, *, device: str = "auto", dtype: str = "auto", memory: Sequence[str] = ()):
    """A ``StableDiffusionXLPipeline`` from a local directory or a hub id, safetensors only.

    On CUDA the weights load in float16, from the ``fp16`` variant when the model has one;
    elsewhere in float32. ``memory`` switches on any of ``MEMORY_OPTIONS``. A model that does
    not load raises ``LabError`` naming every attempt.
    """
    from diffusers import StableDiffusionXLPipeline

    return _load(StableDiffusionXLPipeline, model, device=device, dtype=dtype, memory=memory)


def _load(pipeline_class, model, *, device, dtype, memory, **components):
    bad = [option for option in memory if option not in MEMORY_OPTIONS]
    if bad:
        raise LabError(f"unknown memory option(s) {bad}; choose from {', '.join(MEMORY_OPTIONS)}")
    device = resolve_device(device)
    if dtype == "auto":
        dtype = "float16" if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise LabError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    if "model_cpu_offload" in memory and device.type == "cpu":
        raise LabError("memory option 'model_cpu_offload' moves models between the CPU and a GPU; the device is cpu")

    attempts = []
    local = Path(model).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise LabError(
            f"{local.resolve()} is not a diffusers pipeline directory (no model_index.json); pass the folder "
            "written by save_pretrained, or a hub id such as stabilityai/stable-diffusion-xl-base-1.0"
        )
    if not local.exists():
        attempts.append(f"local directory {local.resolve()} (does not exist)")
    source, where = (str(local), "directory") if local.exists() else (str(model), "hub id")
    for variant in ["fp16", None] if dtype == "float16" else [None]:
        try:
            pipe = pipeline_class.from_pretrained(
                source, **{DTYPE_KEYWORD: DTYPES[dtype]}, variant=variant, use_safetensors=True, **components
            )
        except (OSError, ValueError) as err:
            label = f" (variant {variant})" if variant else ""
            attempts.append(f"{where} {source!r}{label}: {type(err).__name__}: {_first_line(err)}")
            continue
        return _place(pipe, device, memory)
    raise LabError(
        f"could not load the SDXL model {str(model)!r}. Tried: " + "; ".join(attempts)
        + ". Pass a local directory written by save_pretrained (safetensors weights) or a hub id that is "
        "downloaded, or downloadable without HF_HUB_OFFLINE."
    )


def _place(pipe, device: torch.device, memory: Sequence[str]):
    if "model_cpu_offload" in memory:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if "vae_slicing" in memory:
        pipe.vae.enable_slicing()
    if "vae_tiling" in memory:
        pipe.vae.enable_tiling()
    if "attention_slicing" in memory:
        pipe.enable_attention_slicing()
    return pipe


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else "(no message)"


# --- Running ----------------------------------------------------------------------------------


def parse_size(size: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"1024x768"`` or ``(1024, 768)`` → (width, height); None stays None (the model's default)."""
    if size is None:
        return None
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", size)
        if not match:
            raise LabError(f"size must look like WIDTHxHEIGHT, e.g. 1024x1024; got {size!r}")
        size = (int(match[1]), int(match[2]))
    width, height = size
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise LabError(f"width and height must be positive multiples of 8, got {width}x{height}")
    return width, height


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise LabError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise LabError(f"prompts file {path} holds no prompts (one per line; # starts a comment)")
    return prompts


def run_sdxl_lab(
    model: str | Path,
    prompts: str | Sequence[str],
    *,
    negative_prompt: str | None = None,
    guidance_scales: Sequence[float] = (5.0,),
    num_inference_steps: int = 30,
    seeds: Sequence[int] = (0,),
    scheduler: str = "default",
    guidance_method: str = "cfg",
    size: str | Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    memory: Sequence[str] = (),
    refiner: str | Path | None = None,
    refiner_start: float = 0.8,
    batch_size: int = 4,
    image=None,
    mask=None,
    strength: float | None = None,
    pipe=None,
    progress: bool = False,
) -> LabResults:
    """Generate every prompt × guidance scale × seed with an SDXL model; return PIL images + rows.

    ``guidance_scales`` use diffusers' convention (1.0 = no guidance). Each image has its own
    CPU generator seeded with its seed, so an image is the same whatever batch it is drawn in.
    ``scheduler``: ``"default"`` (the model's own), a diffusers name (``ddim``, ``euler``,
    ``dpm++2m``, …) or ``minild:<sampler>``, optionally with the sampler's options
    (``minild:ddim:eta=1``). ``guidance_method``: ``"cfg"``, ``"cfg_rescale[:phi=0.7]"`` (diffusers'
    ``guidance_rescale``), ``"cfg_interval[:sigma_low=0.28,sigma_high=5.42]"`` (CFG only while σ_t
    lies in that interval) or ``"minild:<stage>[:key=value,…]"``, any guidance stage (``minild:apg``);
    see ``minild.lab.guidance``. With ``refiner``, the base model denoises until
    ``refiner_start`` of the schedule and the refiner finishes. With ``out_dir``, writes the PNGs,
    contact sheets, ``results.json`` and ``index.html`` there. Pass a loaded ``pipe`` (``load_sdxl``) to
    reuse it; it keeps its own device, dtype, memory options and scheduler. ``image`` (a PNG/JPEG
    path or PIL image) edits it (img2img, SDEdit), redoing ``strength`` of the schedule, i.e.
    ``int(num_inference_steps * strength)`` steps; ``mask`` (white = regenerate) inpaints it
    instead; see ``minild.lab.editing.read_edit_inputs`` for the sizes and defaults.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _check_run_arguments(prompts, guidance_scales, num_inference_steps, seeds, batch_size, refiner_start)
    check_scheduler_name(scheduler)
    parse_guidance_method(guidance_method)
    inputs = read_edit_inputs(image, mask, strength, num_inference_steps=num_inference_steps,
                              refiner_start=None if refiner is None else refiner_start)
    if pipe is None:
        pipe = load_sdxl(model, device=device, dtype=dtype, memory=memory)
    refiner_pipe = None
    if refiner is not None:
        refiner_pipe = _load_refiner(refiner, pipe, device=device, dtype=dtype, memory=memory)
    width, height = parse_size(size) or (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    if inputs is not None:
        inputs = inputs.resized(width, height)
    pipe, refiner_pipe, notes = editing_pipelines(pipe, refiner_pipe, inputs)
    base = LabImage(
        prompt="", prompt_index=0, negative_prompt=negative_prompt, seed=0, guidance_scale=0.0,
        num_inference_steps=num_inference_steps, scheduler=scheduler, width=width, height=height,
        model=str(model), refiner=None if refiner is None else str(refiner), seconds=0.0, **edit_settings(inputs),
    )
    # A reused pipe keeps its own scheduler: the named one is swapped in for this run only.
    pipes = [p for p in (pipe, refiner_pipe) if p is not None]
    own_schedulers = [p.scheduler for p in pipes]
    try:
        for p in pipes:
            p.set_progress_bar_config(disable=not progress)
            if scheduler != "default":
                p.scheduler = make_scheduler(scheduler, p.scheduler.config)
        scheduler_class = type(pipe.scheduler).__name__
        with applied(pipes, guidance_method) as extra, quiet_dtype_casts():
            images = _generate_all(pipe, refiner_pipe, base, prompts, guidance_scales, seeds, batch_size,
                                   refiner_start, extra, inputs.call_arguments() if inputs else {})
    finally:
        for p, own in zip(pipes, own_schedulers):
            p.scheduler = own
    grids = {prompt: contact_sheet([im for im in images if im.prompt_index == i], seeds, guidance_scales, inputs)
             for i, prompt in enumerate(prompts)}
    settings = {
        "model": str(model), "refiner": base.refiner, "scheduler": scheduler, "scheduler_class": scheduler_class,
        "guidance_method": guidance_method,
        "device": str(pipe.device), "dtype": str(pipe.dtype), "prompts": prompts, "negative_prompt": negative_prompt,
        "guidance_scales": [float(g) for g in guidance_scales], "seeds": list(seeds),
        "num_inference_steps": num_inference_steps, "width": width, "height": height, "memory": list(memory),
        **edit_settings(inputs), "pipeline_class": type(pipe).__name__, "notes": notes,
    }
    results = LabResults(images=images, grids=grids, settings=settings, inputs=inputs)
    if out_dir is not None:
        write_results(results, out_dir)
    return results


def _generate_all(pipe, refiner_pipe, base: LabImage, prompts, guidance_scales, seeds, batch_size, refiner_start,
                  extra, edit):
    """Every prompt × guidance scale × seed, ``batch_size`` seeds per pipeline call; ``edit``: the
    base pipeline's image, mask and strength arguments (none for text-to-image)."""
    images: list[LabImage] = []
    for prompt_index, prompt in enumerate(prompts):
        for guidance_scale in guidance_scales:
            for start in range(0, len(seeds), batch_size):
                batch_seeds = list(seeds[start:start + batch_size])
                began = time.perf_counter()
                pil_images = _generate(
                    pipe, refiner_pipe, prompt, base.negative_prompt, batch_seeds, guidance_scale=guidance_scale,
                    num_inference_steps=base.num_inference_steps, refiner_start=refiner_start, extra=extra,
                    first=edit or dict(width=base.width, height=base.height),
                )
                seconds = round((time.perf_counter() - began) / len(batch_seeds), 3)
                images += [
                    replace(base, prompt=prompt, prompt_index=prompt_index, seed=seed,
                            guidance_scale=float(guidance_scale), seconds=seconds, image=image)
                    for seed, image in zip(batch_seeds, pil_images)
                ]
    return images


def _check_run_arguments(prompts, guidance_scales, num_inference_steps, seeds, batch_size, refiner_start) -> None:
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise LabError("give at least one non-empty prompt")
    if not guidance_scales:
        raise LabError("give at least one guidance scale (e.g. 5.0; 1.0 means no guidance)")
    if not seeds:
        raise LabError("give at least one seed")
    try:
        for seed in seeds:
            check_seed(seed, "every seed")
    except ValueError as err:
        raise LabError(str(err)) from None
    if len(set(seeds)) != len(seeds) or len(set(guidance_scales)) != len(guidance_scales):
        raise LabError(f"seeds {list(seeds)} and guidance scales {list(guidance_scales)} must not repeat")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise LabError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if batch_size < 1:
        raise LabError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 < refiner_start < 1:
        raise LabError(f"refiner_start must lie strictly between 0 and 1, got {refiner_start}")


def _load_refiner(refiner, pipe, *, device, dtype, memory):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    # The SDXL refiner shares the base's second text encoder and VAE.
    return _load(StableDiffusionXLImg2ImgPipeline, refiner, device=device, dtype=dtype, memory=memory,
                 text_encoder_2=pipe.text_encoder_2, vae=pipe.vae)


@torch.no_grad()
def _generate(pipe, refiner_pipe, prompt, negative_prompt, seeds, *, guidance_scale, num_inference_steps,
              refiner_start, extra, first) -> list[Image.Image]:
    def generators():
        return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    common = dict(
        prompt=[prompt] * len(seeds),
        negative_prompt=None if negative_prompt is None else [negative_prompt] * len(seeds),
        guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, **extra,
    )
    if refiner_pipe is None:
        return pipe(**common, **first, generator=generators()).images
    latents = pipe(**common, **first, generator=generators(),
                   denoising_end=refiner_start, output_type="latent").images
    return refiner_pipe(**common, image=latents, denoising_start=refiner_start, generator=generators()).images


# --- Writing ----------------------------------------------------------------------------------


def png_metadata(parameters: dict[str, Any]) -> PngInfo:
    """Every parameter as its own tEXt entry, plus all of them as JSON under ``parameters``."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters, ensure_ascii=False))
    for key, value in parameters.items():
        if key not in ("path", "image"):
            info.add_itxt(key, "" if value is None else str(value))
    return info


def slug(text: str, max_length: int = 40) -> str:
    """A file-name fragment from a prompt: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length].rstrip("-") or "prompt"


def write_results(results: LabResults, out_dir: str | Path) -> Path:
    """PNGs under ``images/``, contact sheets under ``grids/``, then ``results.json`` and ``index.html``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image in results.images:
        folder = f"images/{image.prompt_index:03d}-{slug(image.prompt)}"
        image.path = f"{folder}/seed-{image.seed}_guidance-{image.guidance_scale:g}.png"
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        image.image.save(out_dir / image.path, pnginfo=png_metadata(image.parameters()))
    grid_paths = {}
    for index, (prompt, sheet) in enumerate(results.grids.items()):
        grid_paths[prompt] = f"grids/{index:03d}-{slug(prompt)}.png"
        (out_dir / "grids").mkdir(exist_ok=True)
        sheet.save(out_dir / grid_paths[prompt])
    input_paths = write_inputs(results.inputs, out_dir)
    table = {
        "settings": results.settings,
        "inputs": input_paths,
        "grids": [{"prompt": prompt, "path": path} for prompt, path in grid_paths.items()],
        "images": results.rows,
    }
    (out_dir / "results.json").write_text(json.dumps(table, indent=2, ensure_ascii=False), encoding="utf-8")
    write_gallery(out_dir / "index.html", results.settings, results.rows, grid_paths, input_paths)
    results.out_dir = out_dir
    return out_dir
