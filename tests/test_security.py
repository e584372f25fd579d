"""What minild reads from disk is data, never code: safetensors, JSON and YAML (safe_load)
only; no pickle, no remote code; stages come only from installed entry points."""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import minild
from minild.training import checkpoint
from minild.cli import main
from minild.config import ConfigError, load_config
from tests.conftest import tiny_config
from tests.test_train import tiny_dataset

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(REPO / "minild").rglob("*.py"), *(REPO / "plugins").rglob("*.py")])


# -- the source never calls an unsafe loader --------------------------------------------------


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Calls that could run code from a file: pickle-based loaders, yaml's full loaders,
    ``torch.load`` without ``weights_only=True``, and ``trust_remote_code`` other than False."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{filename}:{node.lineno} imports {m}" for m in modules if m.split(".")[0] in ("pickle", "dill")]
        if not isinstance(node, ast.Call):
            continue
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        remote = keywords.get("trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            found.append(f"{filename}:{node.lineno} passes trust_remote_code={ast.unparse(remote)}")
        if not isinstance(node.func, ast.Attribute):
            continue
        owner, name = ast.unparse(node.func.value), node.func.attr
        if owner == "yaml" and name in ("load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all"):
            found.append(f"{filename}:{node.lineno} calls yaml.{name} (use yaml.safe_load)")
        if owner == "torch" and name == "load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{filename}:{node.lineno} calls torch.load without weights_only=True")
        if owner in ("pickle", "dill", "joblib", "np", "numpy") and name in ("load", "loads"):
            if owner not in ("np", "numpy") or _allows_pickle(keywords):
                found.append(f"{filename}:{node.lineno} calls {owner}.{name}")
    return found


def _allows_pickle(keywords: dict) -> bool:
    value = keywords.get("allow_pickle")
    return value is not None and not (isinstance(value, ast.Constant) and value.value is False)


def test_the_scanner_finds_every_unsafe_call():
    bad = """
import pickle
import yaml, torch, numpy as np
yaml.load(text)
yaml.unsafe_load(text)
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
AutoModel.from_pretrained(path, trust_remote_code=True)
"""
    assert len(unsafe_calls(bad)) == 7
    good = "yaml.safe_load(t)\ntorch.load(p, weights_only=True)\nnp.load(p)\nM.from_pretrained(p, trust_remote_code=False)\n"
    assert unsafe_calls(good) == []


def test_no_source_file_calls_an_unsafe_loader():
    assert len(SOURCES) > 20
    found = [call for path in SOURCES for call in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


# -- files that would run code are never loaded ------------------------------------------------


class RunsCode:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(RunsCode(marker)))


PICKLE_NAMES = ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "ema.pkl", "diffusion_pytorch_model.bin"]


def test_pickles_in_a_saved_pipeline_or_run_dir_are_never_loaded(tmp_path):
    marker = tmp_path / "code-ran"
    run_dir = tmp_path / "run"
    hooks = {"hooks": [{"name": "checkpoint", "every_steps": 1}]}
    pipe = minild.Pipeline.from_config(tiny_config(train=hooks))
    pipe.train(tiny_dataset(32), run_dir=run_dir, max_steps=1)
    pipe.save_pretrained(run_dir)
    step_dir = run_dir / "checkpoints" / "step-000001"
    for name in PICKLE_NAMES:
        write_pickle(run_dir / name, marker)
        write_pickle(step_dir / name, marker)

    minild.Pipeline.from_pretrained(run_dir)
    checkpoint.load_latest(run_dir)
    minild.Pipeline.from_config(tiny_config(train=hooks)).train(tiny_dataset(32), resume=run_dir, max_steps=2)
    assert main(["sample", str(run_dir), "--num", "1", "--steps", "1", "--out", str(tmp_path / "grid.png")]) == 0
    assert not marker.exists()


def test_a_pickle_named_like_a_safetensors_file_is_refused_unread(tmp_path):
    marker = tmp_path / "code-ran"
    minild.Pipeline.from_config(tiny_config()).save_pretrained(tmp_path)
    write_pickle(tmp_path / "model.safetensors", marker)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        minild.Pipeline.from_pretrained(tmp_path)
    assert not marker.exists()


def test_a_checkpoint_manifest_cannot_point_at_other_files(tmp_path):
    marker = tmp_path / "code-ran"
    hooks = {"hooks": [{"name": "checkpoint", "every_steps": 1}]}
    minild.Pipeline.from_config(tiny_config(train=hooks)).train(tiny_dataset(32), run_dir=tmp_path, max_steps=1)
    step_dir = tmp_path / "checkpoints" / "step-000001"
    manifest = json.loads((step_dir / "trainer.json").read_text())
    for name in ("../../secrets.safetensors", "optimizer.pt"):
        files = {**manifest["files"], name: {"bytes": 1, "sha256": "0" * 64}}
        (step_dir / "trainer.json").write_text(json.dumps({**manifest, "files": files}))
        with pytest.raises(checkpoint.CheckpointError, match=r"lists .*; a checkpoint holds only .safetensors files"):
            checkpoint.read_checkpoint(step_dir)
    # A pickle whose digest the manifest records is still refused, unread.
    write_pickle(step_dir / "model.safetensors", marker)
    data = (step_dir / "model.safetensors").read_bytes()
    files = {**manifest["files"], "model.safetensors": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    (step_dir / "trainer.json").write_text(json.dumps({**manifest, "files": files}))
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors is not a safetensors file"):
        checkpoint.read_checkpoint(step_dir)
    assert not marker.exists()


def test_text_encoder_refuses_pickled_weights(tiny_clip_dir, tmp_path, offline):
    from minild_plugins.text_encoders import CLIPTextEncoder, TextEncoderUnavailableError

    marker = tmp_path / "code-ran"
    directory = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, directory)
    (directory / "model.safetensors").unlink()
    write_pickle(directory / "pytorch_model.bin", marker)
    with pytest.raises(TextEncoderUnavailableError, match="cannot load the CLIP text encoder"):
        CLIPTextEncoder(pretrained=str(directory))
    assert not marker.exists()


# -- configs are data -----------------------------------------------------------------------


def test_yaml_tags_that_build_python_objects_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(tiny_config()) + f"seed: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid YAML"):
        load_config(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["subprocess.Popen", "os:system", "builtins.eval", "minild_plugins.unets.blocks"])
def test_a_stage_name_cannot_import_code(name):
    with pytest.raises(ConfigError, match=rf"model.name: unknown model '{name}'"):
        load_config(tiny_config(model={"name": name}))


def test_weights_load_without_torch_load(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    hooks = {"hooks": [{"name": "checkpoint", "every_steps": 1}, {"name": "ema", "decay": 0.9}]}
    pipe = minild.Pipeline.from_config(tiny_config(train=hooks))
    pipe.train(tiny_dataset(32), run_dir=tmp_path, max_steps=1)
    pipe.save_pretrained(tmp_path)
    minild.Pipeline.from_pretrained(tmp_path)
    minild.Pipeline.from_config(tiny_config(train=hooks)).train(tiny_dataset(32), resume=tmp_path, max_steps=2)
