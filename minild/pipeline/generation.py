"""``Pipeline.generate``: every argument checked with one ``ValueError`` that names it, then the
chunked, guided sampling loop (conditioning, guidance, sampler, VAE decoding)."""

from __future__ import annotations

import contextlib
import itertools
import warnings
from numbers import Integral, Real
from typing import Any, Callable

import torch

from minild import plugins
from minild.conditioning import wants_classes, wants_guidance_scale, wants_text
from minild.config import StageSpec, parse_stage
from minild.devices import resolve_batch_size, resolve_device, use_channels_last
from minild.errors import GenerateArgumentError
from minild.pipeline import editing
from minild.pipeline.guidance import check_scale, guided_model_fn

DEFAULT_NUM_INFERENCE_STEPS = 50  # for samplers that configure no num_inference_steps of their own
OUTPUT_TYPES = ("pt", "np", "pil")
PLAIN_CFG = StageSpec("cfg", {"scale": 1.0})  # a config without a guidance stage: the plain conditional model


# -- argument checks -----------------------------------------------------------------------


def check_count(name: str, value: Any, *, allow_none: bool = True) -> int | None:
    """A positive int (not a bool), or None when allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        none = " or None" if allow_none else ""
        raise GenerateArgumentError(f"{name} must be a positive integer{none}, got {value!r}")
    return int(value)


def check_guidance_scale(guidance_scale: Any) -> float | None:
    if guidance_scale is None:
        return None
    try:
        return check_scale(guidance_scale, "guidance_scale")
    except ValueError as err:
        raise GenerateArgumentError(f"{err}; or None for the config's guidance") from None


def class_labels_tensor(class_labels: Any, num_classes: int | None, model_name: str) -> torch.Tensor | None:
    """``class_labels`` as a ``[B]`` int64 CPU tensor: integers (an integral float such as 3.0 is
    taken, 3.5 is refused, bools are refused) in ``[0, num_classes)``."""
    if class_labels is None:
        return None
    if num_classes is None:
        raise GenerateArgumentError(
            f"model {model_name!r} is not class-conditional: set model.num_classes in the config "
            "and train it to use class_labels"
        )
    if isinstance(class_labels, (str, bytes)):
        raise GenerateArgumentError(f"class_labels must be integers, got the string {class_labels!r}")
    if not isinstance(class_labels, torch.Tensor):
        items = [class_labels] if isinstance(class_labels, Real) else class_labels
        try:
            items = list(items)
        except TypeError:
            raise GenerateArgumentError(
                f"class_labels must be a list of integers or an integer tensor, got {type(class_labels).__name__}"
            ) from None
        for index, item in enumerate(items):
            if hasattr(item, "item") and getattr(item, "ndim", 0) == 0:
                item = item.item()  # a NumPy or 0-dim torch scalar
            if isinstance(item, bool) or not isinstance(item, Real) or not float(item).is_integer():
                raise GenerateArgumentError(
                    f"class_labels must be integers; class_labels[{index}] is {item!r}: give whole class indices"
                )
            items[index] = int(item)
        class_labels = torch.tensor(items, dtype=torch.long)
    if class_labels.dtype == torch.bool or class_labels.is_complex():
        raise GenerateArgumentError(f"class_labels must be integers, got a {class_labels.dtype} tensor")
    labels = class_labels.detach().cpu().reshape(-1)
    if labels.is_floating_point():
        if not bool((torch.isfinite(labels) & (labels == labels.round())).all()):
            raise GenerateArgumentError(f"class_labels must be whole numbers, got {labels.tolist()}")
    labels = labels.long()
    if len(labels) == 0:
        raise GenerateArgumentError("class_labels is empty: give one class index per image")
    if labels.min() < 0 or labels.max() >= num_classes:
        outside = sorted({label for label in labels.tolist() if not 0 <= label < num_classes})
        raise GenerateArgumentError(f"class_labels must lie in [0, {num_classes}), got {outside}")
    return labels


def prompt_list(prompts: Any, num_images: int | None) -> list[str] | None:
    """``prompts`` as one non-empty string per image (a single string is repeated)."""
    if prompts is None:
        return None
    if isinstance(prompts, str):
        prompts = [prompts] * (num_images or 1)
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(prompt, str) for prompt in prompts):
        bad = next((f"prompts[{i}] is {p!r} ({type(p).__name__})" for i, p in enumerate(prompts)
                    if not isinstance(p, str)), None) if isinstance(prompts, (list, tuple)) else None
        raise GenerateArgumentError(f"prompts must be a string or a list of strings, got {bad or repr(prompts)}")
    if not prompts:
        raise GenerateArgumentError("prompts is an empty list: give one prompt per image (or one string for all)")
    for index, prompt in enumerate(prompts):
        if not prompt.strip():
            raise GenerateArgumentError(
                f"prompts[{index}] is empty: the empty prompt is the unconditional one the model was trained to "
                "ignore; give text such as 'seven', or guidance_scale=0 for unconditional samples"
            )
    return list(prompts)


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int in [0, 2**64), what ``torch.Generator.manual_seed`` takes without wrapping:
    it maps a negative seed -n onto 2**64 - n, so -1 would quietly draw the noise of seed
    18446744073709551615. Seeds start at 0, as in diffusers."""
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise GenerateArgumentError(f"{name} must be an integer, got {seed!r}")
    if not 0 <= seed < 2**64:
        raise GenerateArgumentError(
            f"{name} must lie in [0, 2**64), got {seed}" + (": torch would wrap a negative seed onto another one "
                                                             "(-1 onto 2**64 - 1); use 0, 1, 2, …" if seed < 0 else "")
        )
    return int(seed)


def warn_truncated(text_encoder, prompts: list[str]) -> None:
    """One warning for all prompts longer than the text encoder's ``max_length`` tokens."""
    truncation = getattr(text_encoder, "truncation", None)
    if truncation is None:
        return
    cut = {prompt: dropped for prompt in dict.fromkeys(prompts) if (dropped := truncation(prompt)) is not None}
    if cut:
        prompt, dropped = next(iter(cut.items()))
        warnings.warn(
            f"{len(cut)} prompt(s) are longer than the text encoder's max_length={text_encoder.max_length} tokens "
            f"and are truncated: {prompt!r} loses {dropped!r}. Shorten them, or train a model with a larger "
            "text_encoder.max_length", stacklevel=4,
        )


def check_generator(generator: Any, seed: Any, num_images: int):
    """A ``torch.Generator``, a list of ``num_images`` of them, or one made from ``seed``; None without either."""
    if generator is not None and seed is not None:
        raise GenerateArgumentError("pass either generator or seed, not both")
    if seed is not None:
        return torch.Generator().manual_seed(check_seed(seed))
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != num_images:
            raise GenerateArgumentError(f"got {len(generator)} generators for {num_images} images; pass one per image")
        return list(generator)
    raise GenerateArgumentError(
        f"generator must be a torch.Generator or a list of them (one per image), got {type(generator).__name__}"
    )


def check_latents(latents: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        kind = f"a {latents.dtype} tensor" if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise GenerateArgumentError(f"latents must be a float tensor of shape {shape}, got {kind}")
    if tuple(latents.shape) != shape:
        raise GenerateArgumentError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise GenerateArgumentError("latents has NaN or inf entries: give finite starting noise")


def check_device(device: Any, default: str) -> torch.device:
    if device is None:
        device = default
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise GenerateArgumentError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    try:
        return resolve_device(device)
    except ValueError as err:
        raise GenerateArgumentError(str(err)) from None


def guidance_spec(config_guidance: StageSpec | None, guidance: Any, guidance_scale: Any) -> StageSpec:
    """The guidance stage of one ``generate`` call: ``guidance`` (name or ``{name, **params}``)
    else the config's (else plain CFG at scale 1), with ``guidance_scale`` as its ``scale``."""
    scale = check_guidance_scale(guidance_scale)
    if guidance is None:
        spec = config_guidance or PLAIN_CFG
    else:
        spec = parse_stage("guidance", guidance, "generate()", "guidance")
    if scale is not None:
        spec = parse_stage("guidance", {**spec.to_dict(), "scale": scale}, "generate()", "guidance")
    return spec


# -- sampling ------------------------------------------------------------------------------


@torch.no_grad()
def generate(pipe, num_images=None, *, class_labels=None, prompts=None, guidance=None, guidance_scale=None,
             num_inference_steps=None, sampler=None, generator=None, seed=None, latents=None, output_type="pt",
             use_ema=True, device=None, callback=None, batch_size="auto", image=None, mask=None, strength=None,
             jump_length=10, jump_n_sample=1):
    """``Pipeline.generate`` (its docstring is the documentation)."""
    num_images = check_count("num_images", num_images)
    num_inference_steps = check_count("num_inference_steps", num_inference_steps)
    if output_type not in OUTPUT_TYPES:
        raise GenerateArgumentError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
    if not isinstance(use_ema, bool):
        raise GenerateArgumentError(f"use_ema must be True or False, got {use_ema!r}")
    if callback is not None and not callable(callback):
        raise GenerateArgumentError(f"callback must be callable (it gets one dict per step), got {callback!r}")
    run_device = check_device(device, pipe.config.train.device)
    spec = guidance_spec(pipe.config.guidance, guidance, guidance_scale)
    if class_labels is not None and not wants_classes(pipe.model) and wants_text(pipe.model):
        raise GenerateArgumentError(
            f"model {pipe.config.model.name!r} is text-conditioned, not class-conditional: pass prompts=[...] "
            "(e.g. prompts=['seven', 'the number 3']) instead of class_labels"
        )
    labels = class_labels_tensor(class_labels, getattr(pipe.model, "num_classes", None), pipe.config.model.name)
    edit = editing.prepare(pipe, image, mask, strength, jump_length, jump_n_sample)
    if edit is not None:  # one output per input image
        num_images = editing.check_batch(edit, num_images, labels, prompts)
    prompts = prompt_list(prompts, num_images)
    if prompts is not None and (pipe.text_encoder is None or not wants_text(pipe.model)):
        instead = " Pass class_labels=[...] instead." if wants_classes(pipe.model) else ""
        raise GenerateArgumentError(
            f"model {pipe.config.model.name!r} is not text-conditioned: prompts need a text_encoder stage "
            "and model.cross_attention_dim in the config (see configs/digits_text_latent.yaml)." + instead
        )
    if prompts is not None:
        warn_truncated(pipe.text_encoder, prompts)
    for name, given in (("class_labels", labels), ("prompts", prompts)):
        if given is not None and num_images is not None and num_images != len(given):
            raise GenerateArgumentError(f"num_images={num_images} but {len(given)} {name} were given")
    if labels is not None and prompts is not None and len(labels) != len(prompts):
        raise GenerateArgumentError(f"got {len(labels)} class_labels but {len(prompts)} prompts; give one of each per image")
    if num_images is None:
        given = labels if labels is not None else prompts if prompts is not None else latents
        num_images = len(given) if isinstance(given, (torch.Tensor, list)) and len(given) else 1
    generator = check_generator(generator, seed, num_images)
    shape = (num_images, *pipe.image_shape)
    if latents is not None:
        check_latents(latents, shape)
    else:  # drawn on the CPU (or the generator's device), so a seed gives the same images everywhere
        latents = _randn(shape, generator)

    sampler_stage = pipe.sampler if sampler is None else pipe._build_sampler(
        parse_stage("sampler", sampler, "generate()", "sampler")
    )
    if num_inference_steps is None:
        num_inference_steps = getattr(sampler_stage, "num_inference_steps", None) or DEFAULT_NUM_INFERENCE_STEPS
    if edit is not None:
        name = pipe.config.sampler.name if sampler is None else parse_stage("sampler", sampler, "generate()", "sampler").name
        editing.plan(edit, pipe, sampler_stage, name, num_inference_steps, generator)
        if edit.num_steps == 0:  # strength too low for one step: the input as it is
            return _convert(edit.images.clone(), output_type)
    guidance_stage = plugins.create("guidance", spec.name, **spec.params)
    model = pipe.ema_model if use_ema and pipe.ema_model is not None else pipe.model
    model.to(run_device).eval()
    cond, uncond = conditioning(pipe, model, labels, prompts, num_images, run_device)
    guided = labels is not None or prompts is not None  # else nothing to guide towards: one unconditional pass
    if wants_guidance_scale(model):  # a distilled student: the scale is its input, one pass per step
        cond["guidance_scale"] = torch.full((num_images,), float(guidance_stage.scale), device=run_device)
        guided = False
    if guided and cond and getattr(guidance_stage, "scale", None) != 1.0 and pipe.config.train.p_uncond <= 0:
        warnings.warn(
            "classifier-free guidance with a model trained without condition dropout (train.p_uncond = 0): "
            "its unconditional predictions are untrained", stacklevel=3,
        )
    chunk_size = resolve_batch_size(batch_size, num_images, run_device, model, pipe.image_shape)
    chunks = []
    # By default channels_last on CPUs (1.3× per forward) and not on GPUs, where the eager model
    # sampled 1.25× faster in its contiguous layout (minild.devices.use_channels_last); only
    # float rounding changes.
    channels_last = use_channels_last(pipe.config.train.channels_last, run_device, compiled=False)
    layout = torch.channels_last if channels_last else None
    vae = pipe.vae if isinstance(pipe.vae, torch.nn.Module) else None  # the decoder gains the same on a CPU
    with memory_format(model, layout), memory_format(vae, layout if vae is not None else None):
        for start in range(0, num_images, chunk_size):
            chunk = slice(start, start + chunk_size)
            chunk_cond = {key: value[chunk] for key, value in cond.items()}
            if guided:  # a fresh guider per chunk: per-run state (APG's momentum) starts afresh
                chunk_uncond = {key: value[chunk] for key, value in uncond.items()}
                model_fn = guided_model_fn(model, chunk_cond, chunk_uncond, guidance_stage.bind(pipe.schedule))
            else:
                model_fn = _conditional(model, chunk_cond)
            chunk_latents = latents[chunk].to(run_device)
            # inference_mode skips autograd's version counting (no_grad does not); the same numbers.
            chunk_generator = generator[chunk] if isinstance(generator, list) else generator
            with torch.inference_mode():
                if edit is None:
                    samples = sampler_stage.sample(
                        model_fn, tuple(chunk_latents.shape), num_inference_steps=num_inference_steps,
                        generator=chunk_generator, latents=chunk_latents, callback=callback,
                    )
                else:  # the latents are the noise that the images are noised with
                    samples = editing.sample_chunk(edit, chunk, sampler_stage, pipe.schedule, model_fn,
                                                   num_inference_steps, chunk_generator, chunk_latents, callback)
                if pipe.vae is not None:
                    samples = pipe.vae.decode(samples.to(module_device(pipe.vae)))
                chunks.append(((samples.float().cpu() + 1) / 2).clamp(0, 1))
    # Outside inference mode: an ordinary (contiguous) tensor the caller may modify.
    images = editing.paste_known(torch.cat(chunks), edit).contiguous()
    return _convert(images, output_type)


def conditioning(pipe, model, labels, prompts, num_images: int, device) -> tuple[dict, dict]:
    """The model's conditional keyword arguments and their unconditional counterparts.

    With neither labels nor prompts, both are the unconditional arguments (the null
    class, the empty prompt).
    """
    cond, uncond = {}, {}
    if wants_classes(model):
        null = torch.full((num_images,), model.num_classes, dtype=torch.long, device=device)
        cond["class_labels"] = labels.to(device) if labels is not None else null
        uncond["class_labels"] = null
    if wants_text(model):
        empty = pipe.text_encoder.encode([""]).to(device).expand(num_images, -1, -1)  # [B, L, D]
        cond["context"] = pipe.text_encoder.encode(prompts).to(device) if prompts is not None else empty
        uncond["context"] = empty
    return cond, uncond


def _conditional(model, cond: dict[str, Any]) -> Callable:
    return (lambda x, t: model(x, t, **cond)) if cond else (lambda x, t: model(x, t))


@contextlib.contextmanager
def memory_format(model: torch.nn.Module, memory_format: torch.memory_format | None):
    """Run ``model`` with its 4-D weights and buffers in ``memory_format`` (None: as they are),
    then give each back the tensor it had: a model in the middle of training (a trainer hook
    sampling) keeps its layout, and a saved model its contiguous one."""
    if memory_format is None:
        yield
        return

    def tensors() -> dict[str, torch.Tensor]:
        return dict(itertools.chain(model.named_parameters(), model.named_buffers()))

    before = {name: tensor.data for name, tensor in tensors().items() if tensor.dim() == 4}
    model.to(memory_format=memory_format)
    try:
        yield
    finally:
        current = tensors()
        for name, data in before.items():
            current[name].data = data


def module_device(module) -> torch.device:
    parameter = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _randn(shape, generator) -> torch.Tensor:
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device).cpu() for g in generator])
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device).cpu()


def _convert(images: torch.Tensor, output_type: str):
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    from PIL import Image

    pixels = (array * 255).round().astype("uint8")
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
