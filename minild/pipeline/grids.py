"""Sample grids of a pipeline: which classes or prompts a grid shows, how it was sampled (its
caption), and the grid written as a labelled PNG (``minild.images.save_labeled_grid``)."""

from __future__ import annotations

from pathlib import Path

from minild import plugins
from minild.conditioning import DEFAULT_PROMPT_TEMPLATES, class_prompt_name, wants_text
from minild.images import GridLayout, save_labeled_grid
from minild.pipeline.generation import DEFAULT_NUM_INFERENCE_STEPS, guidance_spec


def grid_labels(pipe, num: int) -> list[int] | None:
    """Cycle through the classes for a class-conditional model, so the grid shows every class."""
    num_classes = getattr(pipe.model, "num_classes", None)
    return None if num_classes is None else [i % num_classes for i in range(num)]


def grid_prompts(pipe, num: int) -> list[str] | None:
    """For a text-conditioned model whose class names are known, cycle through one prompt per
    class made with the config's first prompt template ("a handwritten digit seven", …)."""
    if not wants_text(pipe.model) or pipe.text_encoder is None or not pipe.class_names:
        return None
    template = (pipe.config.data.prompt_templates or DEFAULT_PROMPT_TEMPLATES)[0]
    names = pipe.class_names
    return [
        template.format(name=class_prompt_name(names[i % len(names)]), label=i % len(names)) for i in range(num)
    ]


def grid_conditions(pipe, num: int) -> dict:
    """``generate`` keyword arguments for a grid of ``num`` images: class labels, prompts or nothing."""
    labels = grid_labels(pipe, num)
    if labels is not None:
        return {"class_labels": labels}
    prompts = grid_prompts(pipe, num)
    return {"prompts": prompts} if prompts is not None else {}


def grid_columns(pipe) -> int | None:
    """One column per class (or per class prompt), so every row of a digit grid reads 0, 1, …, 9."""
    if grid_prompts(pipe, 1) is not None:
        return len(pipe.class_names)
    return getattr(pipe.model, "num_classes", None)


def grid_column_labels(pipe) -> list[str] | None:
    """What each column of a ``grid_conditions`` grid asks for: its prompt, or its class
    ("7" for the digit seven, "Trouser" for Fashion-MNIST, the index without class names)."""
    columns = grid_columns(pipe)
    if columns is None:
        return None
    prompts = grid_prompts(pipe, columns)
    if prompts is not None:
        return prompts
    names = pipe.class_names or []
    return [names[i].split(" - ", 1)[0] if i < len(names) else str(i) for i in range(columns)]


def inference_steps(pipe, num_inference_steps: int | None = None, sampler: str | dict | None = None) -> int:
    """The number of steps ``generate`` walks for these arguments: the given number, else the
    sampler's configured ``num_inference_steps``, else 50."""
    if num_inference_steps is not None:
        return num_inference_steps
    if isinstance(sampler, dict) and sampler.get("num_inference_steps"):
        return sampler["num_inference_steps"]
    configured = getattr(getattr(pipe, "sampler", None), "num_inference_steps", None) if sampler is None else None
    return configured or DEFAULT_NUM_INFERENCE_STEPS


def sampling_caption(pipe, conditions: dict, *, guidance: str | dict | None = None, guidance_scale: float | None = None,
                     num_inference_steps: int | None = None, sampler: str | dict | None = None) -> str:
    """``"cfg guidance, scale 3 · ddim, 50 steps"`` for ``generate`` called with these arguments
    (None: what the pipeline's config gives); no guidance for an unconditional grid."""
    name = sampler if isinstance(sampler, str) else (sampler or {}).get("name") or pipe.config.sampler.name
    steps = f"{name}, {inference_steps(pipe, num_inference_steps, sampler)} steps"
    if not conditions:
        return steps
    spec = guidance_spec(pipe.config.guidance, guidance, guidance_scale)
    scale = plugins.create("guidance", spec.name, **spec.params).scale
    return f"{spec.name} guidance, scale {scale:g} · {steps}"


def save_sample_grid(pipe, images, path: str | Path, *, title: str, conditioned: bool = True) -> GridLayout:
    """A grid of images made with ``grid_conditions(pipe, ...)``: one column per class or prompt,
    labelled (with ``conditioned=False``, e.g. all of one class, a square grid without labels)."""
    labels = grid_column_labels(pipe) if conditioned else None
    if labels is not None:
        labels = labels[:len(images)]
    return save_labeled_grid(images, path, column_labels=labels, title=title)
