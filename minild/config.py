"""Pipeline configuration: plain dataclasses read from YAML, validated once at the edge.

Errors name the file (or "<dict>") and the dotted key, so a user can fix the config
without reading the code. Code below this module trusts what it gets.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from minild import plugins
from minild.io import atomic_write


class ConfigError(ValueError):
    """A config value is missing, unknown, or of the wrong type."""


@dataclass
class StageSpec:
    """One pipeline stage: a registered ``name`` and the keyword ``params`` it is built with."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: str | None = None
    image_size: int | None = None
    channels: int | None = None
    split: str = "train"
    # For text-conditioned models: prompts made from each label, "{name}" → class name
    # ("seven"), "{label}" → class index ("7"); one template is drawn per image and step.
    prompt_templates: list[str] | None = None


@dataclass
class TrainConfig:
    batch_size: int = 64  # images per forward pass, summed over all processes
    grad_accumulation_steps: int = 1  # forward passes per optimizer step
    lr: float = 1e-3  # peak learning rate (after warm-up)
    lr_schedule: typing.Literal["constant", "cosine", "linear"] = "constant"  # after warm-up; decays reach 0 at the end
    warmup_steps: int = 0  # optimizer steps of linear warm-up from lr / warmup_steps to lr
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    max_steps: int | None = None
    epochs: int | None = None
    max_minutes: float | None = None  # training-time budget of the run; a resumed run counts its time before
    p_uncond: float = 0.1  # condition dropout for classifier-free guidance
    # how the ε-MSE weighs the timesteps: uniform (DDPM's simple loss) | min_snr (Min-SNR-γ with
    # γ = min_snr_gamma; minild.training.step.loss_weights)
    loss_weighting: typing.Literal["uniform", "min_snr"] = "uniform"
    min_snr_gamma: float = 5.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: typing.Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16: autocast; fp16: autocast + GradScaler, CUDA only
    # The model's memory format in training and in generate(): true, false, or null = where measured
    # faster (CPUs; CUDA only under train.compile; see minild.devices.use_channels_last)
    channels_last: bool | None = None
    # torch.compile of the model in training: auto | off | default | reduce-overhead (CUDA graphs) |
    # max-autotune; auto = reduce-overhead on CUDA for runs of 5+ minutes, else off (minild.training.step)
    compile: typing.Literal["auto", "off", "default", "reduce-overhead", "max-autotune"] = "auto"
    # steps between loss read-backs when no hook takes the loss each step; None: 1 on CPU, 50 on GPUs
    loss_readback_every: int | None = None
    hooks: list = field(default_factory=lambda: ["progress"])


@dataclass
class PipelineConfig:
    schedule: StageSpec
    model: StageSpec
    sampler: StageSpec
    guidance: StageSpec | None = None  # None: classifier-free guidance at generate()'s guidance_scale (1.0)
    vae: StageSpec | None = None
    # A `minild train-vae` config that trains the VAE into vae.pretrained when that directory does
    # not hold one yet (minild.training.vae_bootstrap); relative paths are tried from the working directory,
    # then from the config file's directory.
    vae_training: str | None = None
    text_encoder: StageSpec | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    image_shape: list[int] | None = None  # [C, H, W] the model sees; taken from the data if None
    seed: int = 0  # seeds the model's initial weights

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, StageSpec):
                value = value.to_dict()
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out

    def dump(self, path: str | Path) -> None:
        _dump_yaml(self.to_dict(), path)


@dataclass
class VAETrainConfig:
    batch_size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-3  # loss = reconstruction MSE + kl_weight · KL, both means per element
    grad_clip: float | None = 1.0
    max_steps: int | None = None
    epochs: int | None = None
    max_minutes: float | None = None
    seed: int = 0
    device: str = "auto"


@dataclass
class VAETrainingConfig:
    """What ``minild train-vae`` reads: the VAE to train, its data and the optimisation."""

    vae: StageSpec
    data: DataConfig = field(default_factory=DataConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"vae": self.vae.to_dict(), "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train)}

    def dump(self, path: str | Path) -> None:
        _dump_yaml(self.to_dict(), path)


def _dump_yaml(data: dict[str, Any], path: str | Path) -> None:
    text = yaml.safe_dump(data, sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


STAGE_KINDS = {
    "schedule": "schedule", "model": "model", "sampler": "sampler", "guidance": "guidance", "vae": "vae",
    "text_encoder": "text_encoder",
}


def load_config(source: str | Path | dict[str, Any]) -> PipelineConfig:
    """Read and validate a pipeline config from a YAML path or a dict."""
    where, raw = _read(source)
    return _build_pipeline_config(raw, where)


def _read(source: str | Path | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(where, the raw mapping of sections) from a YAML path or a dict."""
    if isinstance(source, dict):
        where, raw = "<dict>", source
    else:
        where = str(source)
        try:
            raw = yaml.safe_load(Path(source).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {where} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a mapping of sections, got {type(raw).__name__}")
    return where, raw


def load_vae_training_config(source: str | Path | dict[str, Any]) -> VAETrainingConfig:
    """Read and validate a ``minild train-vae`` config (sections vae, data, train)."""
    where, raw = _read(source)
    _reject_unknown(raw, {f.name: f for f in dataclasses.fields(VAETrainingConfig)}, where, prefix="")
    if raw.get("vae") is None:
        raise ConfigError(f"{where}: missing section 'vae' (e.g. vae: {{name: digits_vae, latent_channels: 4}})")
    return VAETrainingConfig(
        vae=parse_stage("vae", raw["vae"], where, "vae"),
        data=_build_dataclass(DataConfig, raw.get("data") or {}, where, "data"),
        train=_build_dataclass(VAETrainConfig, raw.get("train") or {}, where, "train"),
    )


def _build_pipeline_config(raw: dict[str, Any], where: str) -> PipelineConfig:
    known = {f.name: f for f in dataclasses.fields(PipelineConfig)}
    _reject_unknown(raw, known, where, prefix="")
    for required in ("schedule", "model", "sampler"):
        if raw.get(required) is None:
            raise ConfigError(f"{where}: missing section {required!r} (e.g. {required}: {{name: ...}})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in STAGE_KINDS:
            values[key] = None if value is None else parse_stage(STAGE_KINDS[key], value, where, key)
        elif key == "data":
            values[key] = _build_dataclass(DataConfig, value or {}, where, "data")
        elif key == "train":
            values[key] = _build_dataclass(TrainConfig, value or {}, where, "train")
        else:
            values[key] = _checked(value, _hint(PipelineConfig, key), where, key)
    config = PipelineConfig(**values)
    for index, hook in enumerate(config.train.hooks):
        parse_stage("hooks", hook, where, f"train.hooks[{index}]")
    return config


def parse_stage(kind: str, value: Any, where: str, key: str) -> StageSpec:
    """Turn ``"name"`` or ``{name: ..., **params}`` into a StageSpec checked against the factory."""
    if isinstance(value, StageSpec):
        value = value.to_dict()
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ConfigError(f"{where}: {key} must be a stage name or a mapping with a 'name' key, got {value!r}")
    params = {k: v for k, v in value.items() if k != "name"}
    try:
        registration = plugins.lookup(kind, value["name"])
    except plugins.PluginError as err:
        raise ConfigError(f"{where}: {key}.name: {err}") from None
    check_params(registration.factory, params, where, key, skip_positional=kind == "sampler")
    return StageSpec(value["name"], params)


def check_params(factory: Any, params: dict[str, Any], where: str, key: str, *, skip_positional: bool = False) -> None:
    """Reject params the factory does not accept and values whose type differs from its annotation."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    signature = inspect.signature(factory)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    named = {
        name: p
        for name, p in signature.parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    if skip_positional:  # a sampler's first argument is the schedule, supplied by the pipeline
        named.pop(next(iter(signature.parameters), None), None)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: fall back to default values' types
        hints = {}
    for name, value in params.items():
        if name not in named:
            if accepts_any:
                continue
            options = ", ".join(named) or "(none)"
            hint = plugins.did_you_mean(name, named)
            raise ConfigError(f"{where}: unknown key {key}.{name}{hint}; {key} accepts: {options}")
        expected = hints.get(name)
        if expected is None and named[name].default is not inspect.Parameter.empty and named[name].default is not None:
            expected = type(named[name].default)
        if expected is not None:
            _checked(value, expected, where, f"{key}.{name}")


def _build_dataclass(cls: type, raw: Any, where: str, key: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, got {raw!r}")
    _reject_unknown(raw, {f.name: f for f in dataclasses.fields(cls)}, where, prefix=f"{key}.")
    return cls(**{name: _checked(value, _hint(cls, name), where, f"{key}.{name}") for name, value in raw.items()})


def _reject_unknown(raw: dict, known: dict, where: str, prefix: str) -> None:
    for name in raw:
        if name not in known:
            hint = plugins.did_you_mean(name, known)
            raise ConfigError(f"{where}: unknown key {prefix}{name}{hint}; known keys: {', '.join(known)}")


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _checked(value: Any, expected: Any, where: str, key: str) -> Any:
    if not _matches(value, expected):
        raise ConfigError(f"{where}: {key} must be {_describe(expected)}, got {value!r} ({type(value).__name__})")
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _matches(value: Any, expected: Any) -> bool:
    if expected is Any or expected is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(expected)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple, typing.Sequence) or expected in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(expected) if a is not Ellipsis]
        return not args or all(_matches(item, args[0]) for item in value)
    if origin is dict or expected is dict:
        return isinstance(value, dict)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _describe(expected: Any) -> str:
    if typing.get_origin(expected) in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return "null"
    if typing.get_origin(expected) is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(expected))
    items = [arg for arg in typing.get_args(expected) if arg is not Ellipsis]
    if typing.get_origin(expected) in (list, tuple, typing.Sequence) and items:
        return f"a list of {_describe(items[0])}"
    return getattr(expected, "__name__", str(expected))


def plain_value(text: str) -> Any:
    """A ``key=value`` option's value as written on a command line or in a scheduler name: an
    int, a float, a bool (true/false), None (null/none), or else the string itself."""
    words = {"true": True, "false": False, "null": None, "none": None}
    if text.lower() in words:
        return words[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
