"""``minild train``, ``minild train-vae`` and ``minild distill``."""

from __future__ import annotations

from pathlib import Path

from minild.cli.arguments import INTERRUPTED_EXIT_CODE
from minild.pipeline.grids import grid_conditions, sampling_caption, save_sample_grid
from minild.training import checkpoint, lock, runs


def train(args) -> int:
    from minild.config import load_config
    from minild.pipeline import Pipeline
    from minild.training.vae_bootstrap import ensure_vae

    config = load_config(args.config)
    # A latent config whose vae.pretrained holds no VAE yet trains it first (its vae_training config);
    # --max-steps caps that too, so a quick run checks the whole chain.
    ensure_vae(config, config_path=args.config, max_steps=args.max_steps, device=args.device, log=print)
    pipe = Pipeline.from_config(config)
    overrides = {}
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    if args.device is not None:
        overrides["device"] = args.device
    run_dir = Path(args.out or args.resume or Path("runs") / Path(args.config).stem)
    if args.overwrite and args.resume:
        raise ValueError("--overwrite and --resume exclude each other: --resume continues a run, --overwrite deletes it")
    # Held from before the run directory is read to after its last file is written: a second
    # writer is refused here, before it reads or writes anything (minild.training.lock).
    with lock.hold(run_dir):
        return _train_into(args, pipe, run_dir, overrides)


def _train_into(args, pipe, run_dir: Path, overrides: dict) -> int:
    resume, overwrite = args.resume, args.overwrite
    if resume is not None and Path(resume) == run_dir and runs.read_run(run_dir) is not None \
            and not checkpoint.list_checkpoints(run_dir):
        resume = None  # killed before its first checkpoint: the plan below starts it over, saying so
    if resume is None and not overwrite:
        plan = runs.plan_run(run_dir, pipe.config)
        if plan.message and lock.is_main_process():
            print(plan.message)
        if plan.action == "done":
            return 0
        resume, overwrite = (run_dir if plan.action == "resume" else None), plan.overwrite
    result = pipe.train(run_dir=run_dir, resume=resume, overwrite=overwrite, **overrides)
    if not result.main_process:  # the other processes of an `accelerate launch` run
        return INTERRUPTED_EXIT_CODE if result.interrupted else 0
    if result.resumed_from is not None:
        print(f"resumed from {result.resumed_from}")
    pipe.save_pretrained(run_dir)
    runs.mark_saved(run_dir)
    print(
        f"trained {result.steps} steps ({result.epochs_completed} epochs) in {result.seconds:.0f}s, "
        f"stopped by {result.reason}; final loss {_mean_tail(result.losses):.4f}; saved to {run_dir}"
    )
    if result.interrupted:
        saved = f"checkpoint {result.checkpoint} and " if result.checkpoint is not None else ""
        print(f"interrupted: saved {saved}the pipeline; continue with `minild train {args.config} --resume {run_dir}`")
        return INTERRUPTED_EXIT_CODE
    if args.grid > 0:
        path = run_dir / "samples.png"
        conditions = grid_conditions(pipe, args.grid)
        images = pipe.generate(args.grid, **conditions, guidance_scale=args.guidance_scale, seed=0)  # None: the config's
        caption = sampling_caption(pipe, conditions, guidance_scale=args.guidance_scale)
        save_sample_grid(pipe, images, path, title=f"{run_dir.name} after {result.steps} steps · {caption} · seed 0")
        print(f"wrote {path}")
    return 0


def train_vae(args) -> int:
    from minild.config import load_vae_training_config
    from minild.training.vae import METRICS_NAME, RECONSTRUCTIONS_NAME, train_vae

    config = load_vae_training_config(args.config)
    for key in ("max_steps", "max_minutes", "device"):
        if getattr(args, key) is not None:
            setattr(config.train, key, getattr(args, key))
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    result = train_vae(config, out, log=print)
    metrics = result.metrics
    print(
        f"trained {result.steps} steps ({result.epochs_completed} epochs) in {result.seconds:.0f}s, stopped by "
        f"{result.reason}; latent std {metrics['latent_std']:.4f} → latent_scale {metrics['latent_scale']:.4f}"
    )
    print(f"reconstruction MSE (images in [-1, 1]): train {metrics['reconstruction_mse_train']:.5f}"
          + (f", test {metrics['reconstruction_mse_test']:.5f}" if "reconstruction_mse_test" in metrics else ""))
    print(f"saved the VAE to {out}; wrote {out / RECONSTRUCTIONS_NAME} (originals above, reconstructions below) "
          f"and {out / METRICS_NAME}")
    return 0


def distill(args) -> int:
    from minild.pipeline import Pipeline

    teacher = Pipeline.from_pretrained(args.run_dir)
    if Path(args.out).resolve() == Path(args.run_dir).resolve():
        raise ValueError(f"--out {args.out} is the teacher's run directory: give the student a directory of its own")
    options = {key: getattr(args, key) for key in ("phase_iterations", "batch_size", "max_steps", "device")
               if getattr(args, key) is not None}
    options["teacher_dir"] = str(Path(args.run_dir).resolve())  # cfg-digits on the student plots it beside this
    result = teacher.distill(args.out, steps=args.steps, max_minutes=args.max_minutes, resume=args.resume, **options)
    if result.resumed_from is not None:
        print(f"resumed from {result.resumed_from}")
    print(f"distilled {result.steps} steps ({result.phase} phases) in {result.seconds:.0f}s, stopped by {result.reason}; "
          f"final loss {_mean_tail(result.losses):.4f}; saved the student to {args.out} "
          f"(loss.png, samples/, phases/)")
    if not result.finished:
        print(f"continue with `minild distill {args.run_dir} --out {args.out} --steps {args.steps} --resume`")
    return INTERRUPTED_EXIT_CODE if result.interrupted else 0


def _mean_tail(values: list[float], n: int = 50) -> float:
    tail = values[-n:]
    return sum(tail) / max(len(tail), 1)
