"""The plugin contract of minild: every hook a plugin may implement.

Hooks are called with keyword arguments only. An implementation may accept fewer
arguments than the spec lists, so specs can grow without breaking plugins.
``minild.testing`` checks a schedule, model, sampler or guidance plugin against this contract.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("minild")
hookimpl = pluggy.HookimplMarker("minild")


# ---------------------------------------------------------------------------
# Registration: a plugin hands minild named factories for each kind of stage.
# ``register(name, factory)`` raises if ``name`` is already taken by another
# plugin. Factories are called with keyword arguments only; the keyword
# arguments are recorded in the pipeline config, so they must be plain data
# (numbers, strings, booleans, lists, dicts, None).
# ---------------------------------------------------------------------------


@hookspec
def register_schedules(register):
    """Register noise schedules.

    ``register(name, factory)`` where ``factory(**params) -> minild.NoiseSchedule``.
    The schedule holds 1-D float32 tensors of length ``num_timesteps`` indexed by
    the training timestep t = 0 … T−1 (``betas``, ``alphas_cumprod``, …).
    """


@hookspec
def register_models(register):
    """Register eps-models (noise predictors).

    ``register(name, factory)`` where ``factory(**params) -> torch.nn.Module`` whose
    forward is ``model(x, t, class_labels=None, context=None) -> eps`` with

    - ``x``: ``[B, C, H, W]`` float, the noisy image or latent x_t;
    - ``t``: ``[B]`` int64 training timesteps in ``[0, num_timesteps)``;
    - ``class_labels``: ``[B]`` int64 in ``[0, num_classes]`` (``num_classes`` is the
      null class used for classifier-free guidance) or None;
    - ``context``: ``[B, L, D]`` float text embeddings for cross-attention or None;
    - returns ``eps``: ``[B, C, H, W]``, the predicted noise, same shape as ``x``.

    A model that cannot use a given conditioning argument must raise ``ValueError``.

    Optionally, a model with guidance distilled into it (``guided_student``, ``Pipeline.distill``)
    sets ``takes_guidance_scale = True`` and also takes ``guidance_scale``: ``[B]`` float (or a
    float), the scale of the guidance stage it stands for. ``generate`` then passes the guidance
    stage's scale there and runs one conditional pass per step, with no unconditional one.
    """


@hookspec
def register_samplers(register):
    """Register samplers.

    ``register(name, factory)`` where ``factory(schedule, **params)`` returns an
    object with ``sample(model_fn, shape, *, num_inference_steps, generator=None,
    latents=None, callback=None, **params) -> x0``:

    - ``model_fn(x, t) -> eps``: ``x`` is ``[B, C, H, W]``, ``t`` a ``[B]`` int64 tensor;
      conditioning and guidance are already folded into ``model_fn``. A ``model_fn`` whose
      ``takes_timestep`` attribute is True (the pipeline's guided one) also takes
      ``timestep=`` the step's timestep as a Python int: a sampler that knows it should pass
      it, which spares guidance that depends on t (``cfg_interval``) a read-back of ``t``;
    - ``shape``: ``(B, C, H, W)`` of the samples;
    - ``generator``: a ``torch.Generator`` (or a list of B generators, one per sample)
      that every random draw goes through;
    - ``latents``: optional ``[B, C, H, W]`` starting noise x_T;
    - ``callback``: optional ``callback(info: dict)`` called after every step with at
      least ``{"i", "t", "x", "x0_pred"}``;
    - returns the final sample ``[B, C, H, W]`` in model space (images in [-1, 1]).

    Optionally, starting part-way down the chain, which image editing needs
    (``generate(image=…)``, SDEdit; ``minild.pipeline.editing``):

    - ``sample(…, start_step=k)``: walk only ``timesteps(num_inference_steps)[k:]``, with
      ``latents`` the state x_t at ``t = timesteps(num_inference_steps)[k]`` in the DDPM scale
      (√ᾱ_t x0 + √(1 − ᾱ_t) ε: a noised image, not unit noise); ``start_step=0`` (the default)
      is the ordinary chain. The callback's ``i`` counts the steps taken, from 0. A multistep
      sampler starts its history afresh at the first of them. It needs ``timesteps`` below (the
      pipeline noises the image to ``timesteps(n)[k]``); ``k`` is diffusers' img2img
      ``t_start = n − min(int(n · strength), n)``. A sampler whose ``sample`` takes no
      ``start_step`` is refused for ``generate(image=…)`` with an error that says so.

    Optionally, the step-wise interface that lets the sampler drive diffusers pipelines
    (``minild.lab.scheduler_adapter.MinildScheduler``, ``--scheduler minild:<name>[:key=value,…]``):

    - ``timesteps(num_inference_steps) -> list[int]``: the chain, noisiest first (Python ints);
      each call starts a new chain;
    - ``step(eps, t, x, *, t_prev, generator=None) -> (x_prev, x0_pred)``: one update from
      the state ``x`` at timestep ``t`` to ``t_prev`` (None after the last timestep), all
      ``[B, C, H, W]``; ``t``/``t_prev`` are Python ints, so a step needs no host sync. Random
      draws go through ``generator`` at each step (diffusers passes the pipeline's generator,
      or list of generators, to every step). A multistep sampler may keep state between the
      steps of one chain;
    - optionally ``state_scale(t) -> float`` (or a 0-dim tensor) for a sampler whose state is
      not x_t itself: its state at t is ``state_scale(t) · x_t`` (σ-space samplers such as
      Euler: √(σ_t² + 1)). The driver then starts from ``state_scale(first t) · x_T``
      (diffusers' ``init_noise_sigma``), shows the model ``x / state_scale(t)``
      (``scale_model_input``) and noises images into that scale (``add_noise``). Without it
      the state is x_t.

    Inpainting (``generate(image=…, mask=…)``) drives this step-wise interface itself, since it
    replaces the kept region of the state between steps (and RePaint steps back up the chain);
    a sampler without ``timesteps`` and ``step`` is refused for it with an error that says so.

    The adapter reads the pipeline's scheduler config into the sampler's options of the same
    meaning when it has them: ``steps_offset``, ``timestep_spacing``, ``final_alpha_cumprod``
    (from ``set_alpha_to_one``), ``clip_sample`` ("clip"/"none"), ``clip_sample_range`` and
    ``variance_type``. A sampler without ``steps_offset`` or ``timestep_spacing`` is refused
    for configs that set them away from 0 and "leading".
    """


@hookspec
def register_guidances(register):
    """Register guidance methods: how a step's conditional and unconditional eps are combined.

    ``register(name, factory)`` where ``factory(*, scale: float = …, **params)`` returns a
    guidance object. ``scale`` s follows diffusers: plain CFG is ε_u + s (ε_c − ε_u), 1.0 is the
    conditional model alone; every factory takes it, and ``generate(guidance_scale=…)`` sets it.
    The object has

    - ``scale``: the float it was built with;
    - ``bind(schedule) -> guider``: a fresh guider for one sampling run on ``schedule`` (a
      ``minild.NoiseSchedule``; σ_t = √((1 − ᾱ_t)/ᾱ_t) is the noise level at t). The pipeline
      binds once per run and per chunk of ``generate``, so state such as a momentum average
      starts afresh each time; ``bind`` must not change the object itself.

    and the guider has

    - ``needs_uncond(t: int) -> bool``: whether step t needs the unconditional eps at all;
      False makes the pipeline run only the conditional pass and use its eps as is (e.g. at
      scale 1, or outside a guidance interval);
    - optionally ``needs_cond(t: int) -> bool`` (default True): False runs only the
      unconditional pass and uses its eps as is (CFG at scale 0);
    - optionally ``uncond_depends_on_t: bool`` (default True): False promises that both
      answers are the same at every t, so the pipeline asks once per run (at t = 0); otherwise
      it asks at every step, with the step's timestep as the sampler passes it (the built-in
      samplers do: no host sync), or else read back from ``t`` (a host sync on an accelerator);
    - ``__call__(eps_cond, eps_uncond, *, t, x) -> eps``, called when both passes ran: ``eps_cond``,
      ``eps_uncond`` and ``x`` (the noisy x_t) are ``[B, C, H, W]``, ``t`` a ``[B]`` int64 tensor
      on their device; returns the eps the sampler uses, ``[B, C, H, W]`` in their dtype and on
      their device. Both halves come from one batched forward of the model.

    ``minild.pipeline.guidance.Guidance`` is a base class that implements ``bind``, ``reset`` and the
    scale-1 shortcut, and looks σ_t up on the device without a host sync.
    """


@hookspec
def register_vaes(register):
    """Register autoencoders for latent diffusion.

    ``register(name, factory)`` where ``factory(**params)`` returns a ``torch.nn.Module``
    (frozen while the eps-model trains) with

    - ``encode(images, generator=None) -> latents``: images ``[B, C, H, W]`` float in
      [-1, 1] → latents ``[B, c, h, w]`` already multiplied by the VAE's latent scale
      (Stable Diffusion's ``scaling_factor``), so they have roughly unit variance;
      ``generator`` (a ``torch.Generator``) for VAEs that sample the posterior;
    - ``decode(latents [B, c, h, w]) -> images [B, C, H, W]`` in about [-1, 1];
    - ``latent_shape(image_shape (C, H, W)) -> (c, h, w)``, raising ``ValueError`` for
      images it cannot encode;
    - ``latent_channels``: c, which must equal the eps-model's ``in_channels``;
    - optionally ``save_pretrained(directory) -> params``: writes the VAE into ``directory``
      and returns the factory params (plain data, including ``pretrained``) that rebuild it
      from there. ``Pipeline.save_pretrained`` then saves the VAE into ``RUN_DIR/vae/`` and
      records those params with ``pretrained: vae`` (relative to the run directory), so a
      run directory is self-contained. Without it the saved config keeps the VAE's params.

    A VAE that ``minild train-vae`` can train also has ``training_losses(images,
    generator) -> (reconstruction_mse, kl)`` (scalar tensors; the loss is
    ``reconstruction_mse + train.kl_weight · kl``) and a settable float ``latent_scale``.
    """


@hookspec
def register_text_encoders(register):
    """Register text encoders (frozen conditioners).

    ``register(name, factory)`` where ``factory(**params)`` returns an object with
    ``encode(prompts: list[str]) -> context [B, L, D]`` and an ``embedding_dim`` (D).
    Optional: ``max_length`` (L, in tokens) and ``truncation(prompt) -> str | None``, the part of
    a prompt longer than ``max_length`` tokens that ``encode`` drops (None when it fits), so
    ``generate`` can say which prompts were cut.
    """


@hookspec
def register_trainer_hooks(register):
    """Register trainer hook plugins that a config can switch on by name.

    ``register(name, factory)`` where ``factory(**params)`` returns an object
    implementing any of the ``minild_*`` trainer hooks below. The trainer registers
    that object with the plugin manager for the duration of one training run.

    An object that writes files into ``trainer.run_dir`` sets the class attribute
    ``writes_files = True``: a run without a run directory (``Pipeline.train()`` without
    ``run_dir=``) then leaves it out, with one warning naming every hook left out, so its
    hooks always see a ``run_dir`` Path. A run directory belongs to one run: a hook may
    assume files there are its own run's (a resumed run's included).
    """


# ---------------------------------------------------------------------------
# Trainer hooks: called by ``minild.training.trainer.Trainer`` during ``Pipeline.train``.
# ``trainer`` exposes, read-only unless noted:
#   pipeline, model (the unwrapped nn.Module), optimizer, scheduler (LR), config
#   (TrainConfig), device, run_dir (Path or None), step (optimizer steps done),
#   epoch (full passes done), steps_per_epoch, total_steps (None under a time budget
#   alone), compile_mode (train.compile as resolved for this run: "off" or a torch.compile
#   mode), losses / epoch_losses (the whole run's history, resumed runs included; on a GPU
#   the last few steps' may still be on the device: loss_count counts them too, and
#   read_back_losses() brings them over, one host sync),
#   resumed_from (checkpoint Path or None), seconds_before (training time before this
#   call, from the checkpoint resumed), trained_seconds (the run's training time so far,
#   which max_minutes limits), is_main_process (False on the other
#   processes of a multi-process run: write files only on the main one), and
#   request_stop(reason) (stop after the current step; the first reason wins),
#   save_checkpoint() -> Path (writes run_dir/checkpoints/step-…; None off the main process).
# Implementations run in the order of ``train.hooks``; third-party plugins after
# them. The ``checkpoint`` and ``sample_grid`` hooks run last (``trylast``), so
# a checkpoint or grid at step k sees every other hook's work for step k.
# Hooks that draw random numbers should use their own torch.Generator: the
# global RNG streams are part of a checkpoint.
# ---------------------------------------------------------------------------


@hookspec
def minild_train_start(trainer):
    """Training is about to take its first step (after any resume: ``trainer.step``
    and ``trainer.resumed_from`` say where it continues). Raise ``ValueError`` (or
    ``minild.UnavailableError`` for a missing package) to refuse the run, e.g. for a
    setting it cannot work with. Hooks with ``writes_files`` are only called with a
    ``trainer.run_dir``."""


@hookspec
def minild_train_step_end(trainer, step, loss, lr, batch_size):
    """One optimizer step finished.

    ``step``: steps done so far (1 after the first step); ``loss``: that step's mean
    eps-MSE as a Python float (averaged over gradient-accumulation passes and
    processes); ``lr``: learning rate used; ``batch_size``: images in it (all passes,
    all processes). Not called for a step whose loss is NaN or inf: that step is not
    taken and training stops.

    Reading the loss back is a host sync, which on a GPU stalls the queue of kernels every
    step. So only an implementation that names ``loss`` among its arguments makes the
    trainer read it every step. When none does, the losses stay on the device and are
    read back into ``trainer.losses`` every ``train.loss_readback_every`` steps (default 1
    on a CPU, 50 on GPUs), at each epoch's end and before each checkpoint; ``loss`` is
    then None. A non-finite loss is then noticed at the read-back and stops training
    there (the steps in between were taken; a checkpoint is never written after it).
    """


@hookspec
def minild_train_epoch_end(trainer, epoch, mean_loss):
    """A full pass over the dataset finished; ``epoch`` counts from 1 and
    ``mean_loss`` is the mean of that epoch's step losses."""


@hookspec
def minild_checkpoint_saved(trainer, path, step):
    """A complete checkpoint of the run after ``step`` optimizer steps now exists at
    ``path`` (``run_dir/checkpoints/step-000123``, see ``minild.training.checkpoint``)."""


@hookspec
def minild_samples_saved(trainer, path, step, images):
    """The ``sample_grid`` hook sampled ``images`` ``[B, C, H, W]`` in [0, 1] (CPU,
    fixed seed) after ``step`` optimizer steps and wrote them as a grid to ``path``."""


@hookspec
def minild_train_end(trainer, reason):
    """Training stopped; ``reason`` is ``"max_steps"``, ``"max_minutes"``,
    ``"epochs"``, ``"interrupted (SIGINT)"`` or ``"interrupted (SIGTERM)"`` (Ctrl-C or a
    kill: the step in progress was finished; ``minild.training.interrupts.is_interrupt(reason)``),
    a message starting ``"non-finite loss"`` or the text given to ``trainer.request_stop``.

    Called inside the signal handling: a second Ctrl-C while hooks run here raises
    ``KeyboardInterrupt``, so write files atomically (``minild.io.atomic_write``). After
    the hooks, an interrupted run with a run directory that no hook checkpointed at its
    last step gets a checkpoint (``minild_checkpoint_saved`` follows this call then)."""
