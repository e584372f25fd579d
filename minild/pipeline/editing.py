"""Editing images with a trained pipeline: SDEdit (img2img) and inpainting, with RePaint resampling.

``Pipeline.generate(image=…, strength=…, mask=…)`` calls in here: inputs as users pass them are
turned into batches, the images noised to the step that ``strength`` selects, and (with a mask)
the kept region replaced between the sampler's steps.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable

import torch
import torch.nn.functional as F

from minild.errors import GenerateArgumentError

MASK_THRESHOLD = 0.5  # diffusers' mask processor binarizes at 0.5: >= 0.5 is regenerated


# -- inputs ---------------------------------------------------------------------------------


def load_images(image: Any, channels: int, size: tuple[int, int]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``image`` as a ``[B, C, H, W]`` float tensor in [0, 1] at ``size`` (H, W), and the (H, W)
    each image had as given.

    Accepts a tensor ``[C, H, W]`` or ``[B, C, H, W]`` in [0, 1], a PIL image, a file path, or a
    list of them. PIL images are converted to ``L`` (1 channel) or ``RGB`` (3) and resized with
    Lanczos, tensors resized with nearest-neighbour interpolation, as diffusers' VaeImageProcessor does.
    """
    items = _as_items(image, "image")
    tensors, sizes = [], []
    for index, item in enumerate(items):
        where = "image" if len(items) == 1 else f"image[{index}]"
        if isinstance(item, torch.Tensor):
            batch = _check_unit_tensor(item, where, "an image")
            if batch.shape[1] != channels:
                raise GenerateArgumentError(
                    f"{where} has {batch.shape[1]} channels but the model makes {channels}-channel images: "
                    + ("average the colour channels (image.mean(dim=-3, keepdim=True))" if channels == 1
                       else f"give {channels}-channel images (a grayscale one: image.expand(-1, {channels}, -1, -1))")
                )
            sizes += [tuple(batch.shape[-2:])] * len(batch)
            tensors.append(_resize_tensor(batch, size))
        else:
            picture = _open(item, where).convert("L" if channels == 1 else "RGB")
            sizes.append((picture.height, picture.width))
            tensors.append(_pil_to_tensor(_resize_pil(picture, size)))
    return torch.cat(tensors), sizes


def load_mask(mask: Any, sizes: list[tuple[int, int]], size: tuple[int, int]) -> torch.Tensor:
    """``mask`` as a ``[B, 1, H, W]`` float tensor of 0 (keep) and 1 (regenerate) at ``size``.

    Accepts a tensor ``[H, W]``, ``[1, H, W]`` or ``[B, 1, H, W]`` in [0, 1], a PIL image (taken
    as ``L``), a file path, or a list of them; one mask serves every image. Each mask must have its
    image's size as given (``sizes``); it is resized with the image, then binarized: values
    >= 0.5 are regenerated (diffusers' mask processor does the same).
    """
    items = _as_items(mask, "mask")
    masks = []
    for index, item in enumerate(items):
        where = "mask" if len(items) == 1 else f"mask[{index}]"
        if isinstance(item, torch.Tensor):
            batch = item[None, None] if item.ndim == 2 else item
            if batch.ndim == 3 and batch.shape[0] == 1:
                batch = batch[None]
            if batch.ndim != 4 or batch.shape[1] != 1:
                raise GenerateArgumentError(
                    f"{where} must be [H, W], [1, H, W] or [B, 1, H, W] (one channel), got {tuple(item.shape)}"
                )
            batch = _check_unit_tensor(batch, where, "a mask")
            masks += [(tuple(batch.shape[-2:]), _resize_tensor(m[None], size)) for m in batch]
        else:
            picture = _open(item, where).convert("L")
            masks.append(((picture.height, picture.width), _pil_to_tensor(_resize_pil(picture, size))))
    if len(masks) not in (1, len(sizes)):
        raise GenerateArgumentError(f"got {len(masks)} masks for {len(sizes)} images: give one mask, or one per image")
    for index, image_size in enumerate(sizes):
        mask_size = masks[index if len(masks) > 1 else 0][0]
        if mask_size != image_size:
            raise GenerateArgumentError(
                f"the mask is {mask_size[0]}×{mask_size[1]} but image{'' if len(sizes) == 1 else f'[{index}]'} is "
                f"{image_size[0]}×{image_size[1]} (H×W): give a mask of the image's size"
            )
    stacked = torch.cat([m for _, m in masks])
    return (stacked >= MASK_THRESHOLD).float().expand(len(sizes), -1, -1, -1).contiguous()


def check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, Real) or not 0 <= float(strength) <= 1:
        raise GenerateArgumentError(
            f"strength must be a number in [0, 1] (1 = start from noise, 0 = return the image), got {strength!r}"
        )
    return float(strength)


def _as_items(value: Any, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if not value:
            raise GenerateArgumentError(f"{name} is an empty list: give at least one")
        return list(value)
    return [value]


def _open(item: Any, where: str):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, os.PathLike)):
        try:
            picture = Image.open(item)
            picture.load()
            return picture
        except OSError as err:
            raise GenerateArgumentError(f"{where}: cannot read {os.fspath(item)!r} as an image ({err})") from None
    raise GenerateArgumentError(
        f"{where} must be a tensor in [0, 1], a PIL image or a file path (or a list of them), got {type(item).__name__}"
    )


def _check_unit_tensor(tensor: torch.Tensor, where: str, what: str) -> torch.Tensor:
    """A float ``[B, C, H, W]`` (or ``[C, H, W]``) tensor with finite values in [0, 1], on the CPU."""
    if not tensor.is_floating_point():
        raise GenerateArgumentError(f"{where} must be a float tensor in [0, 1], got {tensor.dtype}: divide 8-bit values by 255")
    batch = tensor.detach().float().cpu()
    batch = batch[None] if batch.ndim == 3 else batch
    if batch.ndim != 4 or batch.shape[0] == 0:
        raise GenerateArgumentError(f"{where} must be [C, H, W] or [B, C, H, W], got {tuple(tensor.shape)}")
    if not bool(torch.isfinite(batch).all()):
        raise GenerateArgumentError(f"{where} has NaN or inf entries: give {what} with values in [0, 1]")
    low, high = float(batch.min()), float(batch.max())
    if low < 0 or high > 1:
        hint = "divide by 255" if high > 1 else "map [-1, 1] to [0, 1] with (x + 1) / 2"
        raise GenerateArgumentError(f"{where} must have values in [0, 1], got [{low:g}, {high:g}]: {hint}")
    return batch


def _resize_tensor(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return batch if tuple(batch.shape[-2:]) == tuple(size) else F.interpolate(batch, size=size)  # nearest


def _resize_pil(picture, size: tuple[int, int]):
    from PIL import Image

    height, width = size
    return picture if picture.size == (width, height) else picture.resize((width, height), Image.LANCZOS)


def _pil_to_tensor(picture) -> torch.Tensor:
    import numpy as np

    array = np.asarray(picture, dtype=np.float32) / 255.0  # [H, W] or [H, W, C]
    tensor = torch.from_numpy(array.copy())
    return (tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1))[None]  # [1, C, H, W]


# -- the edit -------------------------------------------------------------------------------


@dataclass
class Edit:
    """One ``generate(image=…)`` call's edit: the input in pixels and in model space, the mask."""

    images: torch.Tensor  # [B, C, H, W] in [0, 1], the pipeline's pixel size
    mask: torch.Tensor | None  # [B, 1, H, W], 1 = regenerate
    strength: float
    jump_length: int
    jump_n_sample: int
    x0: torch.Tensor | None = None  # [B, c, h, w] the images in model space (latents for a latent model)
    model_mask: torch.Tensor | None = None  # [B, 1, h, w] the mask on the model's grid
    start_step: int = 0
    num_steps: int = 0  # steps the sampler runs: int(num_inference_steps · strength)


def prepare(pipe, image, mask, strength, jump_length, jump_n_sample) -> Edit | None:
    """The checked inputs of an edit, or None without ``image`` (then none of its options may be set)."""
    if image is None:
        for name, value, default in (("mask", mask, None), ("strength", strength, None), ("jump_n_sample", jump_n_sample, 1)):
            if value is not default:
                raise GenerateArgumentError(
                    f"{name} needs image=: the image to edit ({'the region' if name == 'mask' else 'what'} to regenerate)"
                )
        return None
    strength = check_strength(1.0 if strength is None else strength)
    for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise GenerateArgumentError(f"{name} must be an integer >= 1, got {value!r}")
    if jump_n_sample > 1 and mask is None:
        raise GenerateArgumentError("jump_n_sample > 1 (RePaint resampling) needs mask=: it harmonizes an inpainted region")
    channels, height, width = pixel_shape(pipe)
    images, sizes = load_images(image, channels, (height, width))
    masks = load_mask(mask, sizes, (height, width)) if mask is not None else None
    return Edit(images, masks, strength, int(jump_length), int(jump_n_sample))


def pixel_shape(pipe) -> tuple[int, int, int]:
    """(C, H, W) of the pipeline's images: ``image_shape``, or what the VAE decodes its latents to."""
    if pipe.vae is None:
        return tuple(pipe.image_shape)
    with torch.no_grad():
        probe = torch.zeros((1, *pipe.image_shape), device=_module_device(pipe.vae))
        return tuple(pipe.vae.decode(probe).shape[1:])


def check_batch(edit: Edit, num_images, labels, prompts) -> int:
    """The batch size an edit fixes: one output per input image."""
    count = len(edit.images)
    if num_images is not None and num_images != count:
        raise GenerateArgumentError(f"num_images={num_images} but {count} images were given: leave num_images out")
    for name, given in (("class_labels", labels), ("prompts", prompts if isinstance(prompts, (list, tuple)) else None)):
        if given is not None and len(given) != count:
            raise GenerateArgumentError(
                f"got {count} images but {len(given)} {name}: give one per image (repeat an image to edit it several ways)"
            )
    return count


def plan(edit: Edit, pipe, sampler, sampler_name: str, num_inference_steps: int, generator) -> None:
    """Check the sampler can edit, pick the start (diffusers' img2img ``get_timesteps``) and
    bring the images into model space (through the VAE for a latent model)."""
    inpainting = edit.mask is not None
    missing = [name for name in ("timesteps", "step") if not callable(getattr(sampler, name, None))]
    if inpainting and missing:
        raise GenerateArgumentError(
            f"sampler {sampler_name!r} cannot inpaint: it has no {' or '.join(missing)}() (the step-wise interface of "
            "minild.hookspecs.register_samplers); use sampler='ddpm', 'ddim' or 'dpm_solver_pp'"
        )
    if not inpainting and ("timesteps" in missing or not _takes_start_step(sampler)):
        raise GenerateArgumentError(
            f"sampler {sampler_name!r} cannot start from a noised image (image=): its sample() takes no start_step "
            "or it has no timesteps() (see minild.hookspecs.register_samplers); use sampler='ddpm', 'ddim' or "
            "'dpm_solver_pp'"
        )
    init_timestep = min(int(num_inference_steps * edit.strength), num_inference_steps)
    edit.start_step = max(num_inference_steps - init_timestep, 0)
    edit.num_steps = num_inference_steps - edit.start_step
    pixels = edit.images * 2 - 1  # [B, C, H, W] in [-1, 1]
    if pipe.vae is None:
        edit.x0, edit.model_mask = pixels, edit.mask
        return
    vae_generator = generator if isinstance(generator, torch.Generator) else None
    with torch.no_grad():
        edit.x0 = pipe.vae.encode(pixels.to(_module_device(pipe.vae)), generator=vae_generator).float().cpu()
    if edit.mask is not None:
        # A latent cell is regenerated when any of its pixels is (diffusers takes the nearest pixel):
        # so every regenerated pixel comes from a regenerated cell once the kept ones are pasted back.
        edit.model_mask = F.adaptive_max_pool2d(edit.mask, tuple(edit.x0.shape[-2:]))


def _takes_start_step(sampler) -> bool:
    parameters = inspect.signature(sampler.sample).parameters.values()
    return any(p.name == "start_step" or p.kind is p.VAR_KEYWORD for p in parameters)


def sample_chunk(edit: Edit, chunk: slice, sampler, schedule, model_fn: Callable, num_inference_steps: int,
                 generator, noise: torch.Tensor, callback) -> torch.Tensor:
    """One chunk of the edit, in model space: SDEdit through ``sampler.sample(start_step=…)``,
    inpainting through the step-wise interface (``inpaint``)."""
    x0 = edit.x0[chunk].to(noise.device, noise.dtype)
    timesteps = sampler.timesteps(num_inference_steps)[edit.start_step:]
    if edit.model_mask is None:
        x_start = add_noise(x0, noise, schedule.alphas_cumprod[timesteps[0]])
        return sampler.sample(model_fn, tuple(x0.shape), num_inference_steps=num_inference_steps,
                              generator=generator, latents=x_start, callback=callback, start_step=edit.start_step)
    mask = edit.model_mask[chunk].to(noise.device, noise.dtype)
    path = repaint_path(len(timesteps), edit.jump_length, edit.jump_n_sample)
    return inpaint(sampler, schedule.alphas_cumprod, model_fn, x0, mask, noise, timesteps, path, generator, callback)


def paste_known(images: torch.Tensor, edit: Edit | None) -> torch.Tensor:
    """The output with the kept pixels (mask 0) of the input put back exactly."""
    if edit is None or edit.mask is None:
        return images
    return edit.mask * images + (1 - edit.mask) * edit.images


# -- noising and the inpainting loop ----------------------------------------------------------


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε (DDPM eq. 4; diffusers' ``scheduler.add_noise``)."""
    return alpha_cumprod.sqrt() * x0 + (1 - alpha_cumprod).sqrt() * noise


def repaint_path(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The positions on a chain of ``num_steps`` steps that inpainting visits after position 0
    (position p: the state at the chain's p-th timestep; ``num_steps``: the clean image).

    RePaint's schedule (Lugmayr et al. 2022, diffusers' ``RePaintScheduler``): every
    ``jump_length`` steps counted from the clean end, after going down, jump back up
    ``jump_length`` positions and go down again, ``jump_n_sample − 1`` times. ``jump_n_sample=1``
    is the plain chain 1, 2, …, ``num_steps``.
    """
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    path, remaining = [], num_steps  # remaining: steps left to the clean image
    while remaining >= 1:
        remaining -= 1
        path.append(num_steps - remaining)
        if jumps.get(remaining, 0) > 0:
            jumps[remaining] -= 1
            remaining += jump_length
            path.append(num_steps - remaining)
    return path


def inpaint(sampler, alphas_cumprod, model_fn, x0, mask, noise, timesteps: list[int], path: list[int], generator,
            callback) -> torch.Tensor:
    """Walk ``path`` (``repaint_path``) down ``timesteps`` with ``sampler.step``; after each step the
    kept region (mask 0) is the original noised afresh to the new level (RePaint Alg. 1), after a
    jump back up the whole state is noised forward with q(x_to | x_from)."""
    # Legend: x is the DDPM state x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε; a σ-space sampler's own state is
    # state_scale(t) · x_t (minild.hookspecs); ᾱ of the clean end is 1.
    scale = getattr(sampler, "state_scale", lambda t: 1.0)
    takes_timestep = getattr(model_fn, "takes_timestep", False)

    def alpha_at(position: int) -> torch.Tensor:
        return alphas_cumprod[timesteps[position]] if position < len(timesteps) else torch.tensor(1.0)

    x = add_noise(x0, noise, alpha_at(0))
    position, step_index = 0, 0
    for target in path:
        if target < position:  # jump back up: x_to = √(ᾱ_to/ᾱ_from) x_from + √(1 − ᾱ_to/ᾱ_from) z
            ratio = alpha_at(target) / alpha_at(position)
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * _randn_like(x, generator)
            position = target
            continue
        t = timesteps[position]
        t_prev = timesteps[target] if target < len(timesteps) else None
        t_batch = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        eps = model_fn(x, t_batch, timestep=t) if takes_timestep else model_fn(x, t_batch)
        state, x0_pred = sampler.step(eps, t, x * scale(t), t_prev=t_prev, generator=generator)
        x = state / scale(t_prev) if t_prev is not None else state
        known = add_noise(x0, _randn_like(x, generator), alpha_at(target)) if t_prev is not None else x0
        x = mask * x + (1 - mask) * known  # RePaint Alg. 1 line 8
        if callback is not None:
            callback({"i": step_index, "t": t, "x": x, "x0_pred": x0_pred})
        position, step_index = target, step_index + 1
    return x


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise like ``x``, drawn on the generator's device (one per sample for a list)."""
    if isinstance(generator, (list, tuple)):
        draws = [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype) for g in generator]
        return torch.cat(draws).to(x.device)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _module_device(module) -> torch.device:
    parameter = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")

