"""Editing in the SDXL prompt lab: the image to start from (img2img, SDEdit) and the mask of what to
repaint (inpainting), read and checked, and the diffusers SDXL pipeline that edits with them.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from diffusers.utils import deprecation_utils
from PIL import Image, UnidentifiedImageError

# A mask's white (1) is regenerated, its black (0) kept: diffusers' convention.
STRENGTH_IMG2IMG = 0.6  # SDEdit: keep the input's layout and colours, redraw its details
STRENGTH_INPAINT = 1.0  # the masked region starts from pure noise: nothing of it is kept
NOTE_4_CHANNEL_INPAINT = (
    "the model's UNet has 4 input channels (it is not an inpainting UNet): StableDiffusionXLInpaintPipeline "
    "generates the whole image and after every step puts back, outside the mask, the original latents "
    "noised to the next step; an inpainting UNet (9 input channels: latents, mask, masked image) sees the "
    "mask and joins the seams better"
)

# diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns).
DTYPE_KEYWORD = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


class EditError(ValueError):
    """An image, mask or strength the lab cannot edit with; the message says what to change."""


@dataclass
class EditInputs:
    """What an edit starts from: ``image`` (RGB) and ``mask`` (L, or None), as read or ``resized``."""

    image: Image.Image
    mask: Image.Image | None
    strength: float
    image_source: str  # the path it was read from, or "<PIL image>"
    mask_source: str | None

    def resized(self, width: int, height: int) -> EditInputs:
        """Both stretched to ``width`` × ``height`` as diffusers' ``VaeImageProcessor.resize`` does by
        default: Lanczos, the aspect ratio not kept, nothing cropped (the inpaint pipeline then
        binarizes the grey mask at 0.5)."""
        from diffusers.image_processor import VaeImageProcessor

        resize = VaeImageProcessor().resize  # the processor every SDXL pipeline resizes its inputs with
        return replace(self, image=resize(self.image, height, width),
                       mask=None if self.mask is None else resize(self.mask, height, width))

    @property
    def task(self) -> str:
        return "inpaint" if self.mask is not None else "img2img"

    def call_arguments(self) -> dict[str, Any]:
        """The keyword arguments that make a diffusers SDXL img2img or inpaint call this edit."""
        arguments: dict[str, Any] = {"image": self.image, "strength": self.strength}
        if self.mask is not None:
            width, height = self.image.size
            arguments.update(mask_image=self.mask, width=width, height=height)
        return arguments


def check_strength(strength: float, num_inference_steps: int) -> None:
    """``strength`` in [0, 1], and enough of it that ``int(num_inference_steps * strength)`` (the
    steps diffusers runs) is at least one."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or math.isnan(strength) \
            or not 0 <= strength <= 1:
        raise EditError(f"strength must be a number in [0, 1] (the fraction of the schedule the edit runs; "
                        f"1 = start from pure noise), got {strength!r}")
    if int(num_inference_steps * strength) < 1:
        need = math.ceil(1 / strength) if strength > 0 else None
        fix = f"raise --steps to at least {need} or raise --strength" if need else "raise --strength above 0"
        raise EditError(f"strength {strength:g} × {num_inference_steps} steps runs int({num_inference_steps} × "
                        f"{strength:g}) = 0 denoising steps; {fix}")


def read_image(source: str | Path | Image.Image, what: str = "image") -> tuple[Image.Image, str]:
    """A PIL image from a PNG/JPEG path (or a PIL image as it is) and where it came from."""
    if isinstance(source, Image.Image):
        return source, "<PIL image>"
    path = Path(source).expanduser()
    if not path.is_file():
        raise EditError(f"{what} file {path} does not exist; pass the path of a PNG or JPEG file")
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise EditError(f"{what} file {path} is not an image PIL can read ({type(err).__name__}); "
                        "pass a PNG or JPEG file") from None
    return image, str(path)


def read_edit_inputs(image, mask, strength: float | None, *, num_inference_steps: int,
                     refiner_start: float | None = None) -> EditInputs | None:
    """Read and check an edit's inputs before any model loads; None without an ``image`` (text-to-image).

    The image becomes RGB, the mask L (grey; white is regenerated, black kept) and must have the
    image's own size. ``strength`` None: 0.6 for img2img, 1.0 for inpainting. ``refiner_start``:
    where a refiner takes over (None: no refiner).
    """
    if image is None:
        if mask is not None:
            raise EditError("a mask needs the image it masks: pass --image IMG with --mask MASK "
                            "(image= with mask= in Python)")
        if strength is not None:
            raise EditError("strength is the part of an input image's schedule to redo: pass --image IMG with it")
        return None
    strength = (STRENGTH_INPAINT if mask is not None else STRENGTH_IMG2IMG) if strength is None else strength
    check_strength(strength, num_inference_steps)
    if refiner_start is not None and mask is not None:
        raise EditError("--refiner does not combine with --mask: the inpainting refiner gets the base model's "
                        "half-denoised latents as its 'original' and would put them, noise and all, back "
                        "outside the mask; inpaint without --refiner, then refine the result with --image alone")
    if refiner_start is not None and strength <= 1 - refiner_start:
        raise EditError(f"strength {strength:g} starts the edit at {1 - strength:g} of the schedule, at or after "
                        f"the refiner's start {refiner_start:g}: the base model would not run; raise strength "
                        f"above {1 - refiner_start:g} or lower refiner_start below {strength:g}")
    picture, image_source = read_image(image, "image")
    mask_picture, mask_source = read_image(mask, "mask") if mask is not None else (None, None)
    if mask_picture is not None and mask_picture.size != picture.size:
        raise EditError(f"mask {mask_source} is {mask_picture.size[0]}x{mask_picture.size[1]} but image "
                        f"{image_source} is {picture.size[0]}x{picture.size[1]}; draw the mask on the image's "
                        "own size (white = regenerate, black = keep)")
    mask_picture = None if mask_picture is None else mask_picture.convert("L")
    return EditInputs(picture.convert("RGB"), mask_picture, float(strength), image_source, mask_source)


def editing_pipelines(pipe, refiner_pipe, inputs: EditInputs | None):
    """The pipelines that run this edit: ``(base, refiner, notes)``.

    Without ``inputs`` the loaded ones. Otherwise ``StableDiffusionXLImg2ImgPipeline`` or
    ``StableDiffusionXLInpaintPipeline`` made ``from_pipe`` the loaded text-to-image pipeline (the
    same modules, nothing loaded twice); the refiner, an img2img pipeline already, finishes from
    the base's latents. ``notes`` are sentences for the user about how the edit runs.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    in_channels = pipe.unet.config.in_channels
    if inputs is None:
        if in_channels != 4:
            raise EditError(f"the model's UNet takes {in_channels} input channels, an inpainting UNet: give it "
                            "an image and a mask to repaint (--image IMG --mask MASK)")
        return pipe, refiner_pipe, []
    if inputs.mask is None and in_channels != 4:
        raise EditError(f"the model's UNet takes {in_channels} input channels, an inpainting UNet: add --mask MASK "
                        "(white = regenerate) or use a text-to-image SDXL model for img2img")
    pipeline_class = StableDiffusionXLImg2ImgPipeline if inputs.mask is None else StableDiffusionXLInpaintPipeline

    with quiet_dtype_casts():  # from_pipe casts every module, to float32 unless told the pipeline's dtype
        editing = pipeline_class.from_pipe(pipe, **{DTYPE_KEYWORD: pipe.dtype})
    if inputs.mask is None:
        return editing, refiner_pipe, []
    return editing, None, [NOTE_4_CHANNEL_INPAINT] if in_channels == 4 else []


def edit_settings(inputs: EditInputs | None) -> dict[str, Any]:
    """The edit's entries of the lab's settings (``results.json``) and of every image's row."""
    if inputs is None:
        return {"task": "text2img", "init_image": None, "mask_image": None, "strength": None}
    return {"task": inputs.task, "init_image": inputs.image_source, "mask_image": inputs.mask_source,
            "strength": inputs.strength}


def write_inputs(inputs: EditInputs | None, out_dir: Path) -> dict[str, str]:
    """The image and mask as the pipeline got them (at the lab's size) under ``inputs/``; their paths."""
    if inputs is None:
        return {}
    (out_dir / "inputs").mkdir(parents=True, exist_ok=True)
    paths = {"input": "inputs/image.png"}
    inputs.image.save(out_dir / paths["input"])
    if inputs.mask is not None:
        paths["mask"] = "inputs/mask.png"
        inputs.mask.save(out_dir / paths["mask"])
    return paths


@contextmanager
def quiet_dtype_casts():
    """Silence diffusers' "modules ... should be kept in float32" warning, meant for casts after
    loading: ``from_pipe`` casts every module to the dtype it already has, and the img2img and
    inpaint pipelines cast the VAE to float32 and back on purpose (``force_upcast``) in every call,
    so it would repeat once per module and batch."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
