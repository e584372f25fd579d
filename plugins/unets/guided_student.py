"""``guided_student``: a class-conditional eps-model that also takes the guidance scale as an input,
the student of guided distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models").

It wraps the teacher's architecture unchanged (its weights keep their names under ``model.``) and
adds a learned embedding of the scale w to the class vector, which every built-in UNet adds to its
time embedding. The embedding's output layer starts at zero, so a fresh student is the teacher.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

import minild


class GuidanceScaleEmbedding(nn.Module):
    """w ``[B]`` → ``[B, dim]``: Fourier features [w, sin(w·ω_i), cos(w·ω_i)] → Linear → SiLU → Linear.

    ω_i = 2^i · π / 8 for i = 0 … ``num_frequencies`` − 1, fine enough to tell the scales 1 … 8
    apart. The last Linear is zero-initialised: the embedding starts as the zero vector.
    """

    def __init__(self, dim: int, num_frequencies: int = 6, hidden_dim: int = 64):
        super().__init__()
        frequencies = math.pi / 8 * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)
        self.register_buffer("frequencies", frequencies, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies + 1, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, guidance_scale: torch.Tensor) -> torch.Tensor:
        angles = guidance_scale.float()[:, None] * self.frequencies[None, :]  # [B, F]
        features = torch.cat([guidance_scale.float()[:, None], angles.sin(), angles.cos()], dim=-1)  # [B, 2F + 1]
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # [B, dim]


class GuidedStudent(nn.Module):
    """``model(x, t, class_labels=None, context=None, guidance_scale=None) -> eps``.

    - ``teacher``: ``{name: ..., **params}``, the teacher's model stage (a class-conditional model
      with a ``class_embedding`` whose vectors join its time embedding, as every built-in UNet has);
    - ``in_channels``, ``num_classes``: override the teacher's (the pipeline reads ``in_channels``
      from the config to check it against the data or the VAE; the conformance suite sets both);
    - ``default_guidance_scale``: the scale used when a call gives none;
    - ``num_frequencies``, ``hidden_dim``: the size of the scale embedding.

    ``guidance_scale`` is a float or a ``[B]`` float tensor; ``takes_guidance_scale = True`` tells
    ``Pipeline.generate`` to pass it instead of running an unconditional pass.
    """

    takes_guidance_scale = True

    def __init__(self, *, teacher: dict | None = None, in_channels: int | None = None, num_classes: int | None = None,
                 default_guidance_scale: float = 1.0, num_frequencies: int = 6, hidden_dim: int = 64):
        super().__init__()
        if not isinstance(teacher, dict) or not isinstance(teacher.get("name"), str):
            raise ValueError(f"guided_student: teacher must be a model stage {{name: ..., **params}}, got {teacher!r}")
        params = {key: value for key, value in teacher.items() if key != "name"}
        for key, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if value is not None:
                params[key] = value
        self.model = minild.create("model", teacher["name"], **params)
        class_embedding = getattr(self.model, "class_embedding", None)
        if getattr(self.model, "num_classes", None) is None or not isinstance(class_embedding, nn.Module):
            raise ValueError(
                f"guided_student: the teacher model {teacher['name']!r} is not class-conditional (no num_classes and "
                "class_embedding): distill a class-conditional model trained with train.p_uncond > 0"
            )
        if isinstance(default_guidance_scale, bool) or not isinstance(default_guidance_scale, Real):
            raise ValueError(f"guided_student: default_guidance_scale must be a number, got {default_guidance_scale!r}")
        self.num_classes = self.model.num_classes
        self.cross_attention_dim = getattr(self.model, "cross_attention_dim", None)
        self.default_guidance_scale = float(default_guidance_scale)
        dim = class_embedding.embedding.embedding_dim
        self.scale_embedding = GuidanceScaleEmbedding(dim, num_frequencies, hidden_dim)
        self._scale_vectors: torch.Tensor | None = None  # [B, dim] during a forward
        class_embedding.register_forward_hook(self._add_scale_vectors)

    def _add_scale_vectors(self, module, args, output: torch.Tensor) -> torch.Tensor:
        return output if self._scale_vectors is None else output + self._scale_vectors.to(output.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None, guidance_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device)
        if scale.ndim == 0:
            scale = scale.expand(x.shape[0])
        if scale.shape != (x.shape[0],):
            raise ValueError(f"guided_student: guidance_scale must be a number or [B] = [{x.shape[0]}] values, "
                             f"got shape {tuple(scale.shape)}")
        self._scale_vectors = self.scale_embedding(scale)
        try:
            kwargs = {} if context is None else {"context": context}
            return self.model(x, t, class_labels=class_labels, **kwargs)
        finally:
            self._scale_vectors = None
