"""The ``sample_grid`` trainer hook, and the fixed-seed sampling that ``tensorboard`` shares."""

from __future__ import annotations

from pathlib import Path

import torch

from minild import hookimpl, plugins
from minild.training import checkpoint
from minild.pipeline.grids import grid_conditions, sampling_caption, save_sample_grid
from minild_plugins.trainer_hooks.common import check_counts, every


class FixedSeedSamples:
    """What ``num_images`` samples at ``seed`` look like now: the same noise and conditions at
    every call, with the EMA weights when the run keeps them, one column per class for
    class-conditional models. Draws only from its own generator, so training is unchanged.
    ``guidance_scale`` and ``num_inference_steps`` None: the config's guidance and sampler steps."""

    def __init__(self, num_images: int, seed: int, num_inference_steps: int | None, guidance_scale: float | None):
        self.num_images, self.seed = num_images, seed
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale

    def __call__(self, trainer) -> torch.Tensor:
        """``[num_images, C, H, W]`` in [0, 1], on the CPU; leaves the model in train mode."""
        pipe = trainer.pipeline
        images = pipe.generate(
            self.num_images, **grid_conditions(pipe, self.num_images), guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps, seed=self.seed, device=str(trainer.device),
        )
        trainer.model.train()  # generate() put it in eval mode
        return images

    def title(self, trainer) -> str:
        pipe = trainer.pipeline
        weights = "EMA" if pipe.ema_model is not None else "raw"
        caption = sampling_caption(pipe, grid_conditions(pipe, self.num_images), guidance_scale=self.guidance_scale,
                                   num_inference_steps=self.num_inference_steps)
        return f"Samples after {trainer.step} steps, {trainer.epoch} epochs\n{caption} · seed {self.seed} · {weights} weights"


class SampleGrid:
    """Samples ``num_images`` with a fixed ``seed`` every ``every_steps`` steps and/or
    ``every_epochs`` epochs, with the EMA weights when the run keeps them, and writes
    ``run_dir/samples/step-000123.png``; the same seed makes grids comparable over training.
    Class-conditional and text models get one labelled column per class or class prompt;
    ``guidance_scale`` None uses the config's guidance (the plain conditional model without one)."""

    writes_files = True

    def __init__(self, every_steps: int | None = None, every_epochs: int | None = 1, num_images: int = 20,
                 seed: int = 0, num_inference_steps: int | None = None, guidance_scale: float | None = None):
        check_counts("sample_grid", every_steps=every_steps, every_epochs=every_epochs, num_images=num_images,
                     num_inference_steps=num_inference_steps)
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.samples = FixedSeedSamples(num_images, seed, num_inference_steps, guidance_scale)
        self.last_step = None

    @hookimpl
    def minild_train_start(self, trainer):
        self.directory = Path(trainer.run_dir) / "samples"

    @hookimpl(trylast=True)
    def minild_train_step_end(self, trainer, step):
        if every(step, self.every_steps):
            self.write(trainer)

    @hookimpl(trylast=True)
    def minild_train_epoch_end(self, trainer, epoch):
        if every(epoch, self.every_epochs):
            self.write(trainer)

    def write(self, trainer) -> None:
        if not trainer.is_main_process or self.last_step == trainer.step:
            return
        images = self.samples(trainer)
        path = self.directory / f"{checkpoint.checkpoint_dir_name(trainer.step)}.png"
        save_sample_grid(trainer.pipeline, images, path, title=self.samples.title(trainer))
        self.last_step = trainer.step
        hook = plugins.get_plugin_manager().hook
        hook.minild_samples_saved(trainer=trainer, path=path, step=trainer.step, images=images)
