"""``Pipeline``: the stages of one diffusion model, and train / generate / save / load.

A pipeline is built from a config that names a registered plugin for every stage; the
same config (with the image shape filled in) is written by ``save_pretrained``, so a
saved pipeline reloads to the same stages and weights.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from minild import plugins
from minild.conditioning import guided_model_fn, wants_classes, wants_text
from minild.config import PipelineConfig, StageSpec, load_config, parse_stage
from minild.data import known_class_names
from minild.devices import resolve_batch_size
from minild.io import load_weights, save_weights
from minild.train import Trainer, TrainResult, resolve_device

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"
VAE_DIR_NAME = "vae"  # a saved pipeline's copy of its VAE, if the VAE can save itself
ENCODE_BATCH_SIZE = 256  # images per VAE forward when the dataset is encoded for training


class Pipeline:
    """Schedule + eps-model + sampler (+ optional VAE and text encoder).

    Attributes: ``config`` (``PipelineConfig``), ``schedule`` (``NoiseSchedule``),
    ``model`` (the trained ``nn.Module``), ``ema_model`` (EMA weights, set by the
    ``ema`` trainer hook, or None), ``sampler``, ``vae``, ``text_encoder``.
    """

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.schedule = plugins.create("schedule", config.schedule.name, **config.schedule.params)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the model's initial weights depend on the config alone
            self.model = plugins.create("model", config.model.name, **config.model.params)
        self.model.eval()
        self.ema_model: torch.nn.Module | None = None
        # Names of the classes the model was trained on (set by training; digit names for digit data).
        self.class_names: list[str] | None = known_class_names(config.data.dataset)
        self.sampler = self._build_sampler(config.sampler)
        self.vae = _optional_stage("vae", config.vae)
        if self.vae is not None:
            self.vae.eval().requires_grad_(False)
            _check_latent_channels(config, self.vae)
        self._encoded: tuple[Any, Any] | None = None  # (dataset, its latents): train() encodes once
        self.text_encoder = _optional_stage("text_encoder", config.text_encoder)
        if wants_text(self.model) and self.text_encoder is not None:
            if self.text_encoder.embedding_dim != self.model.cross_attention_dim:
                raise ValueError(
                    f"text encoder {config.text_encoder.name!r} gives {self.text_encoder.embedding_dim}-d embeddings "
                    f"but model.cross_attention_dim is {self.model.cross_attention_dim}: make them equal"
                )

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_config(cls, config: str | Path | dict[str, Any] | PipelineConfig) -> "Pipeline":
        """Build an untrained pipeline from a YAML path, a dict or a ``PipelineConfig``."""
        if not isinstance(config, PipelineConfig):
            config = load_config(config)
        return cls(config)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Pipeline":
        """Load a pipeline written by ``save_pretrained`` (safetensors weights, no pickle)."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not directory.is_dir():
            raise FileNotFoundError(
                f"pipeline directory {directory} does not exist: give the directory written by "
                "`minild train CONFIG --out DIR` or Pipeline.save_pretrained"
            )
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{directory} is not a saved minild pipeline: {CONFIG_NAME} is missing "
                "(save one with Pipeline.save_pretrained or `minild train CONFIG --out DIR`)"
            )
        config = load_config(config_path)
        if config.vae is not None and isinstance(config.vae.params.get("pretrained"), str):
            # A VAE saved with the pipeline is recorded relative to the pipeline's directory.
            local = directory / config.vae.params["pretrained"]
            if not Path(config.vae.params["pretrained"]).is_absolute() and local.is_dir():
                config.vae.params["pretrained"] = str(local)
        pipe = cls(config)
        load_weights(pipe.model, directory / WEIGHTS_NAME)
        if (directory / EMA_WEIGHTS_NAME).is_file():
            pipe.ema_model = copy.deepcopy(pipe.model)
            load_weights(pipe.ema_model, directory / EMA_WEIGHTS_NAME)
            pipe.ema_model.requires_grad_(False)
        return pipe

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.yaml``, ``model.safetensors``, (if any) ``ema.safetensors`` and, for a VAE
        that can save itself, its copy in ``vae/``, so the directory is all ``from_pretrained`` needs."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.config.image_shape is None:
            self.config.image_shape = list(self.image_shape)
        save_weights(self.model, directory / WEIGHTS_NAME)
        if self.ema_model is not None:
            save_weights(self.ema_model, directory / EMA_WEIGHTS_NAME)
        else:
            (directory / EMA_WEIGHTS_NAME).unlink(missing_ok=True)
        config = self.config
        if self.vae is not None and hasattr(self.vae, "save_pretrained"):
            params = self.vae.save_pretrained(directory / VAE_DIR_NAME)
            config = copy.deepcopy(config)
            config.vae = StageSpec(config.vae.name, {**params, "pretrained": VAE_DIR_NAME})
        config.dump(directory / CONFIG_NAME)

    def _build_sampler(self, spec: StageSpec):
        return plugins.create("sampler", spec.name, self.schedule, **spec.params)

    # -- training -------------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the model denoises (latents when a VAE is used)."""
        if self.config.image_shape is None:
            shape = self.load_dataset().image_shape
            if self.vae is not None:
                shape = self.vae.latent_shape(shape)
            self.config.image_shape = list(shape)
        return tuple(self.config.image_shape)

    def load_dataset(self):
        from minild.data import load_dataset

        data = self.config.data
        return load_dataset(
            data.dataset, root=data.root, image_size=data.image_size, channels=data.channels, split=data.split
        )

    def train(self, dataset=None, *, run_dir: str | Path | None = None, resume: str | Path | None = None,
              **overrides: Any) -> TrainResult:
        """Train the eps-model; ``overrides`` replace ``train`` config keys for this call
        (e.g. ``max_steps=100``). Uses the configured dataset unless one is given.
        ``resume``: a run directory to continue from its newest complete checkpoint."""
        train_config = copy.deepcopy(self.config.train)
        for key, value in overrides.items():
            if not hasattr(train_config, key):
                raise TypeError(f"train() got an unknown option {key!r}")
            setattr(train_config, key, value)
        if dataset is None:
            dataset = self.load_dataset()
        if len(dataset) == 0:
            raise ValueError(
                f"the training dataset is empty (data.dataset {self.config.data.dataset!r}, "
                f"split {self.config.data.split!r}): point data at images to train on"
            )
        if self.vae is not None:
            dataset = self.encode_dataset(dataset, seed=train_config.seed)
        if self.config.image_shape is None:
            self.config.image_shape = list(dataset.images.shape[1:] if hasattr(dataset, "images") else dataset[0][0].shape)
        self.check_model_input()
        return Trainer(self, train_config, run_dir=run_dir, resume=resume).fit(dataset)

    def check_model_input(self) -> None:
        """Fail before any work, naming the config keys to change, when the model cannot
        denoise ``image_shape``: another channel count than the data's (or the VAE's latents'),
        a size it rejects, or an eps of another shape than its input."""
        channels, height, width = self.image_shape
        model_name = self.config.model.name
        in_channels = _model_in_channels(self.config.model)
        if in_channels is not None and in_channels != channels:
            if self.vae is not None:
                source = f"the vae {self.config.vae.name!r} gives {channels}-channel latents"
                fix = f"set model.in_channels: {channels} (the VAE's latent channels)"
            else:
                source = f"the data gives {channels}-channel images (data.dataset {self.config.data.dataset!r})"
                fix = f"set model.in_channels: {channels}, or data.channels: {in_channels} to convert the images"
            raise ValueError(
                f"model {model_name!r} takes {in_channels}-channel inputs (model.in_channels) but {source}: {fix}"
            )
        # One zero sample through the model finds the sizes it cannot take, in milliseconds.
        device = next(self.model.parameters()).device
        x = torch.zeros(1, channels, height, width, device=device)  # [1, C, H, W]
        cond, _ = self._conditioning(self.model, None, None, 1, device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                eps = self.model(x, torch.zeros(1, dtype=torch.long, device=device), **cond)
        except (ValueError, RuntimeError) as err:
            raise ValueError(
                f"model {model_name!r} cannot take {channels}×{height}×{width} inputs: {' '.join(str(err).split())}; "
                "change data.image_size (or the model's levels)"
            ) from err
        finally:
            self.model.train(was_training)
        if eps.shape != x.shape:
            raise ValueError(
                f"model {model_name!r} returns eps of shape {list(eps.shape[1:])} for inputs of shape "
                f"{[channels, height, width]}: set model.out_channels: {channels} (or leave it unset)"
            )

    @torch.no_grad()
    def encode_dataset(self, dataset, *, seed: int = 0):
        """The dataset's images through the VAE, once: an in-memory dataset of ``(latent, label)``.

        Training sees these latents every epoch. With the VAE's ``posterior: mode`` (the default)
        they are the posterior means; with ``posterior: sample`` one draw per image (from ``seed``),
        fixed for the run. The result is kept, so training again on the same dataset object (or on
        the returned latents) does not encode it again.
        """
        from minild.data import ImageTensorDataset

        if self._encoded is not None and any(dataset is known for known in self._encoded):
            return self._encoded[1]  # encoded before, or already the latents
        vae_device = _module_device(self.vae)
        generator = torch.Generator().manual_seed(seed)
        latents, labels = [], []
        for images, batch_labels in _image_batches(dataset, ENCODE_BATCH_SIZE):
            expected = tuple(self.vae.latent_shape(tuple(images.shape[1:])))  # raises for images it cannot take
            batch = self.vae.encode(images.to(vae_device), generator=generator).float().cpu()  # [B, c, h, w]
            if tuple(batch.shape[1:]) != expected:
                raise ValueError(
                    f"vae {self.config.vae.name!r} encoded {tuple(images.shape[1:])} images to "
                    f"{tuple(batch.shape[1:])} latents but its latent_shape() says {expected}"
                )
            latents.append(batch)
            labels.append(torch.as_tensor(batch_labels, dtype=torch.long))
        encoded = ImageTensorDataset(torch.cat(latents), torch.cat(labels), getattr(dataset, "class_names", None))
        self._encoded = (dataset, encoded)
        return encoded

    # -- generation -----------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        num_images: int | None = None,
        *,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        sampler: str | dict[str, Any] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        use_ema: bool = True,
        device: str | None = None,
        callback: Callable[[dict], None] | None = None,
        batch_size: int | str | None = "auto",
    ):
        """Sample images, returned in [0, 1].

        ``guidance_scale`` follows diffusers: ``eps = eps_u + s · (eps_c − eps_u)``, so 1.0
        is the plain conditional model (no unconditional pass), 0.0 the unconditional one,
        and the classifier-free-guidance paper's weight w is ``s − 1``.
        ``sampler`` overrides the configured one by name or ``{name: ..., **params}``.
        ``output_type``: ``"pt"`` → ``[B, C, H, W]`` float tensor on the CPU; ``"np"`` →
        ``[B, H, W, C]`` float array; ``"pil"`` → list of PIL images.

        ``batch_size``: images denoised together (None: all at once); with guidance each forward
        sees twice as many. The default ``"auto"`` is ``minild.devices.default_batch_size``: 64 on
        a CPU, which keeps 1,000 guided 28×28 digits well under 1 GiB of peak RSS (128 comes close
        to it), 32 on MPS, and on CUDA as many as half the free memory holds. x_T is drawn for all images first, so chunking
        does not change (beyond float rounding) the images of a deterministic sampler (DDIM with
        eta 0, DPM-Solver++), nor of any sampler given one generator per image; a stochastic
        sampler sharing one generator draws its per-step noise chunk after chunk. ``callback``
        is called for every step of every chunk. The model runs in channels_last memory format
        (unless ``train.channels_last`` is off) and is given back its own layout afterwards.
        """
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        labels = self._class_labels(class_labels, num_images)
        prompts = self._prompts(prompts, num_images)
        if labels is not None and prompts is not None and len(labels) != len(prompts):
            raise ValueError(f"got {len(labels)} class_labels but {len(prompts)} prompts; give one of each per image")
        if num_images is None:
            given = labels if labels is not None else prompts if prompts is not None else latents
            num_images = len(given) if given is not None else 1
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(f"got {len(generator)} generators for {num_images} images; pass one per image")
        if generator is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None

        sampler_stage = self.sampler if sampler is None else self._build_sampler(
            parse_stage("sampler", sampler, "generate()", "sampler")
        )
        model = self.ema_model if use_ema and self.ema_model is not None else self.model
        run_device = resolve_device(device or self.config.train.device)
        model.to(run_device).eval()
        cond, uncond = self._conditioning(model, labels, prompts, num_images, run_device)
        if labels is None and prompts is None:
            guidance_scale = 1.0  # nothing to guide towards: one unconditional pass
        if cond and guidance_scale != 1.0 and self.config.train.p_uncond <= 0:
            warnings.warn(
                "classifier-free guidance with a model trained without condition dropout (train.p_uncond = 0): "
                "its unconditional predictions are untrained", stacklevel=2,
            )
        shape = (num_images, *self.image_shape)
        if latents is None:  # drawn on the CPU, so a seed gives the same images on every device
            latents = _randn(shape, generator)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        chunk_size = resolve_batch_size(batch_size, num_images, run_device, model, self.image_shape)
        chunks = []
        # channels_last makes the convolutions faster on CPUs and GPUs (here 1.3× per forward on
        # a CPU); only float rounding changes. MPS does not take it, as in training.
        channels_last = self.config.train.channels_last and run_device.type != "mps"
        with _memory_format(model, torch.channels_last if channels_last else None):
            for start in range(0, num_images, chunk_size):
                chunk = slice(start, start + chunk_size)
                model_fn = guided_model_fn(
                    model, {k: v[chunk] for k, v in cond.items()}, {k: v[chunk] for k, v in uncond.items()},
                    guidance_scale,
                )
                chunk_latents = latents[chunk].to(run_device)
                # inference_mode skips autograd's version counting (no_grad does not); the same numbers.
                with torch.inference_mode():
                    samples = sampler_stage.sample(
                        model_fn, tuple(chunk_latents.shape), num_inference_steps=num_inference_steps,
                        generator=generator[chunk] if isinstance(generator, list) else generator,
                        latents=chunk_latents, callback=callback,
                    )
                    if self.vae is not None:
                        samples = self.vae.decode(samples.to(_module_device(self.vae)))
                    chunks.append(((samples.float().cpu() + 1) / 2).clamp(0, 1))
        # Outside inference mode: an ordinary (contiguous) tensor the caller may modify.
        images = torch.cat(chunks).contiguous()
        return _convert(images, output_type)

    def _class_labels(self, class_labels, num_images: int | None) -> torch.Tensor | None:
        num_classes = getattr(self.model, "num_classes", None)
        if class_labels is None:
            return None
        if num_classes is None:
            raise ValueError(
                f"model {self.config.model.name!r} is not class-conditional: set model.num_classes in the config "
                "and train it to use class_labels"
            )
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class_labels must lie in [0, {num_classes}), got {labels.tolist()}")
        if num_images is not None and num_images != len(labels):
            raise ValueError(f"num_images={num_images} but {len(labels)} class_labels were given")
        return labels

    def _prompts(self, prompts, num_images: int | None) -> list[str] | None:
        if prompts is None:
            return None
        if isinstance(prompts, str):
            prompts = [prompts] * (num_images or 1)
        prompts = list(prompts)
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError("prompts must be a string or a list of strings")
        if self.text_encoder is None or not wants_text(self.model):
            raise ValueError(
                f"model {self.config.model.name!r} is not text-conditioned: prompts need a text_encoder stage "
                "and model.cross_attention_dim in the config (see configs/digits_text_cfg.yaml)"
            )
        if num_images is not None and num_images != len(prompts):
            raise ValueError(f"num_images={num_images} but {len(prompts)} prompts were given")
        return prompts

    def _conditioning(self, model, labels, prompts, num_images: int, device) -> tuple[dict, dict]:
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
            empty = self.text_encoder.encode([""]).to(device).expand(num_images, -1, -1)  # [B, L, D]
            cond["context"] = self.text_encoder.encode(prompts).to(device) if prompts is not None else empty
            uncond["context"] = empty
        return cond, uncond


def _model_in_channels(spec: StageSpec) -> int | None:
    """The ``in_channels`` a model is built with: its config value or the factory's default."""
    if "in_channels" in spec.params:
        return spec.params["in_channels"]
    parameter = inspect.signature(plugins.lookup("model", spec.name).factory).parameters.get("in_channels")
    return parameter.default if parameter is not None and isinstance(parameter.default, int) else None


def _optional_stage(kind: str, spec: StageSpec | None):
    return None if spec is None else plugins.create(kind, spec.name, **spec.params)


def _check_latent_channels(config: PipelineConfig, vae) -> None:
    """The eps-model denoises the VAE's latents, so its in_channels must be the latent channels."""
    if not isinstance(getattr(vae, "latent_channels", None), int):
        raise plugins.PluginError(
            f"vae {config.vae.name!r} has no integer latent_channels attribute, which minild.hookspecs."
            "register_vaes asks of every VAE: fix the plugin that registers it"
        )
    in_channels = _model_in_channels(config.model)
    if in_channels != vae.latent_channels:
        raise ValueError(
            f"vae {config.vae.name!r} makes {vae.latent_channels}-channel latents but the model "
            f"{config.model.name!r} has in_channels={in_channels}: set model.in_channels: {vae.latent_channels} "
            "in the config (the eps-model denoises latents, not images)"
        )
    if config.image_shape is not None and config.image_shape[0] != vae.latent_channels:
        raise ValueError(
            f"image_shape {config.image_shape} has {config.image_shape[0]} channels but vae {config.vae.name!r} "
            f"makes {vae.latent_channels}-channel latents: remove image_shape from the config to take it from the VAE"
        )


@contextlib.contextmanager
def _memory_format(model: torch.nn.Module, memory_format: torch.memory_format | None):
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


def _module_device(module) -> torch.device:
    parameter = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _image_batches(dataset, batch_size: int):
    """``(images [B, C, H, W], labels [B])`` over the whole dataset in order."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        for start in range(0, len(dataset), batch_size):
            yield dataset.images[start : start + batch_size], dataset.labels[start : start + batch_size]
        return
    yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _randn(shape, generator) -> torch.Tensor:
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    return torch.randn(shape, generator=generator)


def _convert(images: torch.Tensor, output_type: str):
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    from PIL import Image

    pixels = (array * 255).round().astype("uint8")
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
