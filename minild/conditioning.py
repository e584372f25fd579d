"""Conditioning: class labels and prompts → the model's keyword arguments, with their
unconditional counterparts (the null class, the empty prompt) for condition dropout and
classifier-free guidance."""

from __future__ import annotations

from typing import Sequence

import torch

# Prompts for datasets with class names when a config gives none: "{name}" is the class
# name ("seven" for the digit 7), "{label}" its index ("7").
DEFAULT_PROMPT_TEMPLATES = ["{name}"]


def class_prompt_name(class_name: str) -> str:
    """``"7 - seven"`` (torchvision's MNIST naming) → ``"seven"``; other names unchanged."""
    return class_name.split(" - ", 1)[-1]


def wants_classes(model) -> bool:
    return getattr(model, "num_classes", None) is not None


def wants_text(model) -> bool:
    return getattr(model, "cross_attention_dim", None) is not None


def wants_guidance_scale(model) -> bool:
    """A model with guidance inside it (a distilled student) takes ``guidance_scale=`` [B] floats."""
    return getattr(model, "takes_guidance_scale", False) is True


class TrainingConditioner:
    """Per-batch conditioning for training, with condition dropout at rate ``p_uncond``.

    Class-conditional models get the label (or the null class ``num_classes``); text models
    get the embedding of a prompt made from the label with a random template (or of the
    empty prompt). Prompt embeddings are computed once, before the first step.
    """

    def __init__(self, model, text_encoder, class_names: Sequence[str] | None, templates: Sequence[str] | None,
                 p_uncond: float, device: torch.device):
        self.p_uncond = p_uncond
        self.num_classes = model.num_classes if wants_classes(model) else None
        self.context_table = self.empty_context = None
        if wants_text(model):
            if text_encoder is None:
                raise ValueError("the model has cross_attention_dim set but the config has no text_encoder stage")
            if not class_names:
                raise ValueError("text conditioning makes prompts from class names, but the dataset has none")
            templates = list(templates or DEFAULT_PROMPT_TEMPLATES)
            prompts = [
                template.format(name=class_prompt_name(name), label=label)
                for label, name in enumerate(class_names)
                for template in templates
            ]
            context = text_encoder.encode(prompts).to(device)  # [C * K, L, D]
            self.context_table = context.reshape(len(class_names), len(templates), *context.shape[1:])  # [C, K, L, D]
            self.empty_context = text_encoder.encode([""]).to(device)  # [1, L, D]

    @property
    def active(self) -> bool:
        return self.num_classes is not None or self.context_table is not None

    def __call__(self, labels: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Model keyword arguments for a batch of dataset ``labels`` ``[B]``."""
        if not self.active:
            return {}
        drop = torch.rand(len(labels), generator=generator, device=labels.device) < self.p_uncond  # [B]
        kwargs = {}
        if self.num_classes is not None:
            kwargs["class_labels"] = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        if self.context_table is not None:
            num_templates = self.context_table.shape[1]
            template = torch.randint(0, num_templates, (len(labels),), generator=generator, device=labels.device)
            context = self.context_table[labels, template]  # [B, L, D]
            kwargs["context"] = torch.where(drop[:, None, None], self.empty_context, context)
        return kwargs

