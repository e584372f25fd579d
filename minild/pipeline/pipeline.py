"""``Pipeline``: the stages of one diffusion model, and train / generate / save / load.

A pipeline is built from a config that names a registered plugin for every stage; the
same config (with the image shape filled in) is written by ``save_pretrained``, so a
saved pipeline reloads to the same stages and weights.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from minild import plugins
from minild.pipeline import generation
from minild.training import checkpoint, lock
from minild.conditioning import wants_text
from minild.config import PipelineConfig, StageSpec, load_config
from minild.data import known_class_names
from minild.io import load_weights, save_weights
from minild.training.trainer import Trainer, TrainResult

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"
VAE_DIR_NAME = "vae"  # a saved pipeline's copy of its VAE, if the VAE can save itself
ENCODE_BATCH_SIZE = 256  # images per VAE forward when the dataset is encoded for training


class Pipeline:
    """Schedule + eps-model + sampler (+ optional VAE and text encoder).

    Attributes: ``config`` (``PipelineConfig``), ``schedule`` (``NoiseSchedule``),
    ``model`` (the trained ``nn.Module``), ``ema_model`` (EMA weights, set by the
    ``ema`` trainer hook, or None), ``sampler``, ``guidance`` (the configured guidance stage or
    None), ``vae``, ``text_encoder``.
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
        self.guidance = _optional_stage("guidance", config.guidance)  # None: plain CFG at generate()'s scale
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
              overwrite: bool = False, **overrides: Any) -> TrainResult:
        """Train the eps-model; ``overrides`` replace ``train`` config keys for this call
        (e.g. ``max_steps=100``). Uses the configured dataset unless one is given.

        ``run_dir``: where the file-writing hooks (metrics_log, loss_plot, sample_grid,
        checkpoint, tensorboard) write; without one they are skipped, with one warning.
        ``resume``: a run directory to continue from its newest complete checkpoint. A
        ``run_dir`` that already holds a run is refused unless ``overwrite`` deletes that run.
        Ctrl-C (or SIGTERM) stops after the current step and returns the result with
        ``interrupted=True`` (after writing a checkpoint when there is a run directory); a
        second Ctrl-C raises ``KeyboardInterrupt`` at once. While it trains, it holds ``run_dir``'s
        lock (``minild.training.lock``): a second writer into the same directory is refused."""
        written = run_dir if run_dir is not None or resume is None else checkpoint.run_dir_of(resume)
        with lock.hold(written):
            return self._train(dataset, run_dir=run_dir, resume=resume, overwrite=overwrite, **overrides)

    def distill(self, out_dir: str | Path, *, steps: int = 4, max_minutes: float | None = None, resume: bool = False,
                **options: Any):
        """Distil this guided class-conditional run into a ``steps``-step student that takes the
        guidance scale as an input, saved as a run directory in ``out_dir`` (docs/distillation.md).

        The teacher is the EMA model (else the model). Phase 1 trains a ``guided_student`` to match
        the guided eps of the run's guidance stage at scales w ~ U[1, 4]; each later phase halves its
        chain (progressive distillation) down to ``steps`` (a power of two). ``max_minutes`` splits a
        time budget evenly between the phases; ``options`` are the other ``DistillConfig`` fields
        (``phase_iterations``, ``batch_size``, ``lr``, ``start_steps``, ``max_steps``, …). Checkpoints
        go to ``out_dir/checkpoints``; ``resume=True`` continues the newest, exactly. Ctrl-C stops
        after the current step (a checkpoint and the student are saved; ``result.interrupted``).
        Holds ``out_dir``'s lock while it runs. Returns a ``DistillResult`` (``.student`` is the
        student pipeline)."""
        from minild.training import distill

        with lock.hold(out_dir):
            return distill.distill(self, out_dir, steps=steps, max_minutes=max_minutes, resume=resume, **options)

    def _train(self, dataset, *, run_dir, resume, overwrite, **overrides: Any) -> TrainResult:
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
        return Trainer(self, train_config, run_dir=run_dir, resume=resume, overwrite=overwrite).fit(dataset)

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
        cond, _ = generation.conditioning(self, self.model, None, None, 1, device)
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
        vae_device = generation.module_device(self.vae)
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

    def generate(
        self,
        num_images: int | None = None,
        *,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        prompts: str | Sequence[str] | None = None,
        guidance: str | dict[str, Any] | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: str | dict[str, Any] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        use_ema: bool = True,
        device: str | None = None,
        callback: Callable[[dict], None] | None = None,
        batch_size: int | str | None = "auto",
        image: Any = None,
        mask: Any = None,
        strength: float | None = None,
        jump_length: int = 10,
        jump_n_sample: int = 1,
    ):
        """Sample images, returned in [0, 1]; or edit ``image`` (SDEdit, inpainting: docs/editing.md).

        ``guidance`` overrides the config's guidance stage by name or ``{name: ..., **params}``
        (``"cfg"``, ``"cfg_interval"``, ``"cfg_rescale"``, ``"apg"`` or a plugin's); ``guidance_scale``
        overrides the ``scale`` of whichever guidance applies. A config without a ``guidance``
        stage uses plain classifier-free guidance at scale 1.0. Scales follow diffusers:
        ``eps = eps_u + s · (eps_c − eps_u)``, so 1.0 is the plain conditional model (no
        unconditional pass), 0.0 the unconditional one, and the classifier-free-guidance paper's
        weight w is ``s − 1``. ``sampler`` overrides the configured one by name or
        ``{name: ..., **params}``; ``num_inference_steps`` None takes the sampler's configured
        ``num_inference_steps``, else 50. ``output_type``: ``"pt"`` → ``[B, C, H, W]`` float tensor
        on the CPU; ``"np"`` → ``[B, H, W, C]`` float array; ``"pil"`` → list of PIL images.

        ``batch_size``: images denoised together (None: all at once); with guidance each forward
        sees twice as many. The default ``"auto"`` is ``minild.devices.default_batch_size``: 64 on
        a CPU, which keeps 1,000 guided 28×28 digits well under 1 GiB of peak RSS (128 comes close
        to it), 32 on MPS, and on CUDA as many as half the free memory holds. x_T is drawn for all
        images first, so chunking does not change (beyond float rounding) the images of a
        deterministic sampler (DDIM with eta 0, DPM-Solver++), nor of any sampler given one
        generator per image; a stochastic sampler sharing one generator draws its per-step noise
        chunk after chunk. The guidance is
        bound afresh for every chunk (its per-run state, e.g. APG's momentum, starts over).
        ``callback`` is called for every step of every chunk. The model runs in channels_last
        memory format on a CPU and contiguous on a GPU (``train.channels_last`` true or false
        forces one) and is given back its own layout afterwards. Every argument is checked: a wrong one is a ``ValueError`` naming it.

        Editing (``minild.pipeline.editing``). ``image``: a ``[B, C, H, W]`` (or ``[C, H, W]``) tensor in [0, 1],
        a PIL image, a file path or a list of them, resized to the pipeline's image size (PIL:
        Lanczos, tensors: nearest, as diffusers' VaeImageProcessor); one output per image, and
        ``latents`` (optional) are then the noise ε the images are noised with. ``strength`` in
        [0, 1] (default 1) follows diffusers' img2img: the chain of ``num_inference_steps`` is
        entered at ``t_start = n − min(int(n · strength), n)``, the image noised to that timestep,
        and ``int(n · strength)`` steps run (none: the input comes back). ``mask`` (tensor, L-mode
        PIL image, path, one per image or one for all, of the image's size; binarized at 0.5,
        1 = regenerate) inpaints: after every step the kept region is the image noised afresh to
        that level (on the latent grid for a latent model: a cell is regenerated when any of its
        pixels is), and the kept pixels are pasted back at the end, so they come back exactly.
        ``jump_n_sample`` > 1 adds RePaint's resampling: every ``jump_length`` steps the state is
        noised back up ``jump_length`` steps and denoised again, ``jump_n_sample − 1`` times.
        """
        return generation.generate(
            self, num_images, class_labels=class_labels, prompts=prompts, guidance=guidance,
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, sampler=sampler,
            generator=generator, seed=seed, latents=latents, output_type=output_type, use_ema=use_ema,
            device=device, callback=callback, batch_size=batch_size, image=image, mask=mask, strength=strength,
            jump_length=jump_length, jump_n_sample=jump_n_sample,
        )


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


def _image_batches(dataset, batch_size: int):
    """``(images [B, C, H, W], labels [B])`` over the whole dataset in order."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        for start in range(0, len(dataset), batch_size):
            yield dataset.images[start : start + batch_size], dataset.labels[start : start + batch_size]
        return
    yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
