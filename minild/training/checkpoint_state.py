"""The trainer's state that is neither weights nor counters, as safetensors tensors plus JSON: the
RNG states a step can touch, and the optimizer's state dict (``minild.training.checkpoint`` writes them)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG state a training step can touch: tensors and their JSON remainder."""
    tensors = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = cuda_state
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, python_state, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(python_state, dtype=torch.int64)
    json_state = {
        "numpy": {"kind": kind, "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "gauss_next": gauss_next},
    }
    return tensors, json_state


def restore_global_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Set the global torch (CPU, CUDA), numpy and python RNGs to the states ``capture_rng``
    gave: ``tensors`` named ``rng.<name>`` (a checkpoint's ``trainer.safetensors``) and ``state``
    (its JSON remainder)."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda_states and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"], tensors["rng.numpy"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached_gaussian"],
    ))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(tensors["rng.python"].tolist()), python_state["gauss_next"]))


def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` → tensors named ``state.<param>.<key>`` + the JSON rest."""
    tensors, rest = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value
            else:
                rest.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": rest}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict:
    """The inverse of ``split_optimizer_state``: a state dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in rest["state"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{key: tuple(value) if key == "betas" else value for key, value in group.items()}
              for group in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give restored moment tensors their parameter's memory format (channels_last), as the
    optimizer's own ``zeros_like(param)`` initialisation does."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
