"""The ``minild`` command line: train, sample, plugins, experiment, lab. Only this module prints and exits."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from minild import checkpoint, plugins, runs
from minild.config import plain_value
from minild.errors import UnavailableError
from minild.images import grid_conditions, sampling_caption, save_sample_grid

# Classifier-free guidance for class-conditional models, in diffusers' convention:
# 1.0 is the plain conditional model, 3.0 is the paper's w = 2.
GUIDANCE_SCALE = 3.0
GUIDANCE_HELP = "classifier-free guidance for class-conditional models: 1.0 = plain conditional, 0 = unconditional"
RUN_GUIDANCE_HELP = ("guidance scale, diffusers' convention: 1.0 = plain conditional, 0 = unconditional "
                     "(default: the run's guidance stage, plain conditional without one)")


# What a user can fix (a config, a path, a missing package, a full disk): printed as one line.
# Anything else is a bug in minild or a plugin and keeps its traceback.
USER_ERRORS = (ValueError, OSError, UnavailableError)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:  # a second Ctrl-C: the files written so far are complete ones
        if args.debug:
            raise
        print("minild: aborted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"minild: error: {_one_line(err)} (run `minild --debug ...` for the traceback)", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minild", description="A plugin-based mini latent-diffusion pipeline.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a pipeline from a YAML config and save it")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("--out", default=None, help="run directory to save into (default: runs/<config name>, or RUN_DIR)")
    train.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue RUN_DIR from its newest complete checkpoint (see the `checkpoint` hook)")
    train.add_argument("--overwrite", action="store_true",
                       help="delete the run that --out holds and start over (by default an unfinished run of the "
                            "same config is resumed, a finished one left as it is, another config's refused)")
    train.add_argument("--max-steps", type=int, default=None,
                       help="stop after N optimizer steps (a VAE trained first for the run is capped at N steps too)")
    train.add_argument("--max-minutes", type=float, default=None, help="stop after M minutes of training")
    train.add_argument("--device", default=None, help="auto, cpu, cuda or mps (default: from the config)")
    train.add_argument("--grid", type=int, default=100, help="images in the sample grid written after training (0: none)")
    train.add_argument("--guidance-scale", type=float, default=None, help=RUN_GUIDANCE_HELP)
    train.set_defaults(run=_train)

    train_vae = commands.add_parser("train-vae", help="train a VAE stage for latent diffusion and save it")
    train_vae.add_argument("config", help="YAML config with vae, data and train sections (see configs/digits_vae.yaml)")
    train_vae.add_argument("--out", default=None, help="directory to save the VAE into (default: runs/<config name>)")
    train_vae.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    train_vae.add_argument("--max-minutes", type=float, default=None, help="stop after M minutes of training")
    train_vae.add_argument("--device", default=None, help="auto, cpu, cuda or mps (default: from the config)")
    train_vae.set_defaults(run=_train_vae)

    sample = commands.add_parser("sample", help="sample a grid of images from a saved run")
    sample.add_argument("run_dir", help="directory written by `minild train` or Pipeline.save_pretrained")
    sample.add_argument("--num", type=int, default=None,
                        help="number of images (default 100), or of images per --prompt (default 10)")
    sample.add_argument("--steps", type=int, default=None,
                        help="number of inference steps (default: the sampler's num_inference_steps, else 50)")
    sample.add_argument("--sampler", default=None, help="sampler name (default: the run's sampler)")
    sample.add_argument("--eta", type=float, default=None, help="DDIM eta (with --sampler ddim)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--class-label", type=int, default=None, help="generate only this class")
    sample.add_argument("--prompt", action="append", default=None,
                        help="a prompt for a text-conditioned run (repeat for more): one row of --num images each")
    sample.add_argument("--guidance", metavar="NAME[:KEY=VALUE,...]", default=None,
                        help="guidance method and its params, e.g. apg or cfg_interval:scale=3,sigma_low=0.3 "
                             "(default: the run's; see `minild plugins`)")
    sample.add_argument("--guidance-scale", type=float, default=None, help=RUN_GUIDANCE_HELP)
    sample.add_argument("--no-ema", action="store_true", help="sample with the raw weights, not the EMA")
    sample.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/samples.png)")
    sample.set_defaults(run=_sample)

    listing = commands.add_parser("plugins", help="list registered stages and the plugins that provide them")
    listing.set_defaults(run=_plugins)

    experiment = commands.add_parser("experiment", help="score a saved digit run with the digit classifier")
    experiments = experiment.add_subparsers(dest="experiment", required=True)
    cfg = experiments.add_parser("cfg-digits", help="class accuracy and digit-FID across guidance scales")
    cfg.add_argument("run_dir", help="a saved class-conditional digit run")
    cfg.add_argument("--methods", type=_guidance_specs, nargs="+", default=None, metavar="NAME[:k=v,…]",
                     help="guidance methods to compare, comma-separated, each with optional parameters, e.g. "
                          "cfg,cfg_interval:sigma_low=0.3,apg (default: the run's configured guidance)")
    cfg.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0, 5.0, 7.5],
                     help=GUIDANCE_HELP + "; each method is run at every scale")
    cfg.add_argument("--per-class", type=int, default=100, help="images per digit, method and scale")
    cfg.add_argument("--sampler", default=None, help="sampler name (default: the run's sampler)")
    cfg.add_argument("--steps", type=int, default=None, help="number of inference steps (default: the pipeline's)")
    cfg.add_argument("--seed", type=int, default=0)
    cfg.add_argument("--batch-size", type=int, default=200, help="images per generate() call")
    cfg.add_argument("--out", default=None, help="output folder (default: RUN_DIR/cfg_digits)")
    cfg.set_defaults(run=_experiment)
    prompt = experiments.add_parser("prompt-digits", help="how often each prompt yields its digit")
    prompt.add_argument("run_dir", help="a saved text-conditioned digit run")
    prompt.add_argument("--prompts-file", default=None, help="YAML mapping digit → list of prompts "
                        "(default: 'a handwritten digit seven', '7', 'seven' for every digit)")
    prompt.add_argument("--per-prompt", type=int, default=20, help="images per prompt")
    prompt.add_argument("--methods", type=_guidance_specs, nargs="+", default=None, metavar="NAME[:k=v,…]",
                        help="with --scales: the guidance frontier over methods × scales × phrasings instead")
    prompt.add_argument("--scales", type=float, nargs="+", default=None, help="guidance scales of the frontier")
    prompt.add_argument("--phrasings", nargs="+", default=None, metavar="TEMPLATE",
                        help="frontier prompt templates, e.g. 'the digit {label}' (default: training ones and held-out)")
    prompt.add_argument("--per-class", type=int, default=20, help="frontier images per digit, cell and phrasing")
    prompt.add_argument("--sampler", default=None, help="frontier sampler name (default: the run's sampler)")
    prompt.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE, help=GUIDANCE_HELP)
    prompt.add_argument("--steps", type=int, default=None,
                        help="number of inference steps (default 50; the frontier: the run's sampler's)")
    prompt.add_argument("--seed", type=int, default=0)
    prompt.add_argument("--batch-size", type=int, default=200, help="images per generate() call")
    prompt.add_argument("--out", default=None, help="output folder (default: RUN_DIR/prompt_digits)")
    prompt.set_defaults(run=_experiment)

    lab = commands.add_parser("lab", help="prompt labs on pretrained diffusers models")
    labs = lab.add_subparsers(dest="lab", required=True)
    sdxl = labs.add_parser("sdxl", help="every prompt × guidance × seed with an SDXL model: PNGs, sheets, index.html")
    sdxl.add_argument("--model", required=True, help="SDXL pipeline directory (save_pretrained) or hub id")
    prompts = sdxl.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    prompts.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line (# comments)")
    sdxl.add_argument("--negative", default=None, help="negative prompt for every image")
    sdxl.add_argument("--guidance", type=_float_list, default=[5.0],
                      help="comma-separated guidance scales, diffusers' convention (1 = none), e.g. 3,5,7.5")
    sdxl.add_argument("--steps", type=int, default=30, help="number of inference steps")
    sdxl.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated seeds, e.g. 0,1,2")
    sdxl.add_argument("--scheduler", default="default",
                      help="default (the model's), ddim, ddpm, euler, euler_a, dpm++2m, dpm++2m_karras, unipc, "
                           "or minild:<sampler>[:key=value,...] (e.g. minild:dpm_solver_pp, minild:ddim:eta=1)")
    sdxl.add_argument("--guidance-method", default="cfg",
                      help="cfg, cfg_rescale[:phi=0.7] (diffusers' guidance_rescale), "
                           "cfg_interval[:sigma_low=0.28,sigma_high=5.42] (CFG only while sigma_t is in the interval), "
                           "or minild:NAME[:key=value,...] for any guidance stage (e.g. minild:apg)")
    sdxl.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's, 1024x1024 for SDXL)")
    sdxl.add_argument("--out", required=True, help="output folder")
    sdxl.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    sdxl.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, else float32), float16, bfloat16, float32")
    sdxl.add_argument("--memory", type=_str_list, default=[],
                      help="comma-separated: model_cpu_offload, vae_slicing, vae_tiling, attention_slicing")
    sdxl.add_argument("--refiner", default=None, help="SDXL refiner directory or hub id (finishes each image)")
    sdxl.add_argument("--refiner-start", type=float, default=0.8,
                      help="fraction of the schedule the base model runs before the refiner takes over")
    sdxl.add_argument("--batch-size", type=int, default=4, help="seeds generated together")
    sdxl.set_defaults(run=_lab_sdxl)
    return parser


def _float_list(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 3,5,7.5; got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _guidance_specs(text: str) -> list[dict]:
    """``cfg,cfg_interval:sigma_low=0.3,sigma_high=2,apg`` → one ``parse_guidance`` spec per method:
    a piece with ``=`` and no ``:`` is one more parameter of the method before it."""
    methods: list[str] = []
    for piece in _str_list(text):
        if "=" in piece and ":" not in piece:
            if not methods:
                raise argparse.ArgumentTypeError(f"{piece!r} has no method before it; write NAME:{piece}")
            methods[-1] += ("," if ":" in methods[-1] else ":") + piece
        else:
            methods.append(piece)
    try:
        return [parse_guidance(method) for method in methods]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace("--guidance", "--methods")) from None


def parse_guidance(text: str) -> dict:
    """``"cfg_interval:scale=3,sigma_low=0.3"`` → ``{"name": "cfg_interval", "scale": 3, "sigma_low": 0.3}``:
    values that look like integers, numbers, booleans (true/false) or null become them."""
    name, _, params = text.partition(":")
    stage: dict = {"name": name.strip()}
    if not stage["name"]:
        raise ValueError(f"--guidance {text!r}: give a guidance name, e.g. --guidance apg or cfg_interval:scale=3")
    for item in filter(None, (item.strip() for item in params.split(","))):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not key or not equals:
            raise ValueError(f"--guidance {text!r}: {item!r} is not KEY=VALUE; write e.g. {stage['name']}:scale=3")
        stage[key] = plain_value(value)
    return stage


def _train(args) -> int:
    from minild.config import load_config
    from minild.pipeline import Pipeline
    from minild.vae_bootstrap import ensure_vae

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
    resume, overwrite = args.resume, args.overwrite
    if resume is not None and Path(resume) == run_dir and runs.read_run(run_dir) is not None \
            and not checkpoint.list_checkpoints(run_dir):
        resume = None  # killed before its first checkpoint: the plan below starts it over, saying so
    if resume is None and not overwrite:
        plan = runs.plan_run(run_dir, pipe.config)
        if plan.message and _is_main_process():
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


def _train_vae(args) -> int:
    from minild.config import load_vae_training_config
    from minild.vae_training import METRICS_NAME, RECONSTRUCTIONS_NAME, train_vae

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


def _sample(args) -> int:
    from minild.images import save_labeled_grid
    from minild.pipeline import Pipeline

    if args.prompt is not None and args.class_label is not None:
        raise ValueError("give --prompt or --class-label, not both")
    num = args.num if args.num is not None else 10 if args.prompt is not None else 100
    if num < 1:
        raise ValueError(f"--num must be a positive number of images, got {num}")
    guidance = parse_guidance(args.guidance) if args.guidance is not None else None
    pipe = Pipeline.from_pretrained(args.run_dir)
    sampler = None
    if args.sampler is not None or args.eta is not None:
        sampler = {"name": args.sampler or pipe.config.sampler.name}
        if args.eta is not None:
            sampler["eta"] = args.eta
    if args.prompt is not None:  # one row of num images per prompt
        conditions = {"prompts": [prompt for prompt in args.prompt for _ in range(num)]}
    elif args.class_label is not None:
        conditions = {"class_labels": [args.class_label] * num}
    else:
        conditions = grid_conditions(pipe, num)
    images = pipe.generate(
        **conditions, guidance=guidance, guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
        sampler=sampler, seed=args.seed, use_ema=not args.no_ema, **({} if conditions else {"num_images": num}),
    )
    path = Path(args.out or Path(args.run_dir) / "samples.png")
    caption = sampling_caption(pipe, conditions, guidance=guidance, guidance_scale=args.guidance_scale,
                               num_inference_steps=args.steps, sampler=args.sampler)
    title = f"{Path(args.run_dir).name}: " + (f"class {args.class_label} · " if args.class_label is not None else "")
    title += f"{caption} · seed {args.seed}" + (" · raw weights" if args.no_ema and pipe.ema_model is not None else "")
    if args.prompt is not None:
        save_labeled_grid(images.unflatten(0, (len(args.prompt), num)), path, row_labels=args.prompt, title=title)
    else:
        save_sample_grid(pipe, images, path, title=title, conditioned=args.class_label is None)
    print(f"wrote {path}")
    return 0


def _plugins(args) -> int:
    rows = [("KIND", "NAME", "PLUGIN", "PACKAGE")]
    for kind in plugins.KINDS:
        for name, entry in sorted(plugins.registry(kind).items()):
            rows.append((kind, name, entry.plugin, entry.package or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    for name, reason in sorted(plugins.broken_plugins.items()):
        print(f"broken plugin {name}: {reason}")
    return 0


def _experiment(args) -> int:
    from minild import experiments
    from minild.conditioning import wants_text
    from minild.guidance_frontier import run_prompt_frontier
    from minild.metrics import load_digit_classifier
    from minild.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.run_dir)
    common = dict(num_inference_steps=args.steps, seed=args.seed, batch_size=args.batch_size)
    text = wants_text(pipe.model)
    # A text model's frontier: methods × scales × phrasings (cfg-digits, or prompt-digits with --scales/--methods).
    frontier = text and (args.experiment == "cfg-digits" or args.scales is not None or args.methods is not None)
    if args.experiment == "cfg-digits" and not text and getattr(pipe.model, "num_classes", None) != 10:
        raise ValueError(f"{args.run_dir} is not a class-conditional digit run (model.num_classes must be 10) nor a "
                         "text-conditioned one; cfg-digits needs one (train configs/digits_class_cfg.yaml)")
    if args.experiment == "prompt-digits" and not text:
        raise ValueError(f"{args.run_dir} is not a text-conditioned run; prompt-digits needs one "
                         "(train configs/digits_text_latent.yaml)")
    out = Path(args.out or Path(args.run_dir) / args.experiment.replace("-", "_"))
    methods = [spec for specs in args.methods for spec in specs] if args.methods else None
    classifier = load_digit_classifier()
    print(f"digit classifier: {classifier.info['test_accuracy']:.1%} accuracy on the held-out test digits")
    if frontier:
        run_prompt_frontier(pipe, methods=methods, guidance_scales=args.scales or (1.0, 2.0, 3.0, 5.0),
                            phrasings=getattr(args, "phrasings", None), per_class=args.per_class, sampler=args.sampler,
                            out_dir=out, classifier=classifier, log=print, **common)
    elif args.experiment == "cfg-digits":
        experiments.run_cfg_digits(pipe, methods=methods, guidance_scales=args.scales, per_class=args.per_class,
                                   sampler=args.sampler, out_dir=out, classifier=classifier, log=print, **common)
    else:
        prompts = (experiments.load_prompts_file(args.prompts_file) if args.prompts_file
                   else experiments.default_digit_prompts())
        experiments.run_prompt_digits(pipe, prompts, per_prompt=args.per_prompt, guidance_scale=args.guidance_scale,
                                      out_dir=out, classifier=classifier, **{**common, "num_inference_steps": args.steps or 50})
    print((out / ("prompts.md" if args.experiment == "prompt-digits" and not frontier else "results.md")).read_text())
    print(f"wrote {out}")
    return 0


def _lab_sdxl(args) -> int:
    from minild.lab import read_prompts, run_sdxl_lab

    prompts = args.prompt if args.prompt else read_prompts(args.prompts)
    results = run_sdxl_lab(
        args.model, prompts, negative_prompt=args.negative, guidance_scales=args.guidance,
        num_inference_steps=args.steps, seeds=args.seeds, scheduler=args.scheduler,
        guidance_method=args.guidance_method, size=args.size, out_dir=args.out, device=args.device, dtype=args.dtype, memory=args.memory, refiner=args.refiner,
        refiner_start=args.refiner_start, batch_size=args.batch_size, progress=True,
    )
    seconds = sum(image.seconds for image in results.images)
    print(f"generated {len(results.images)} images in {seconds:.1f}s on {results.settings['device']} "
          f"({results.settings['scheduler_class']})")
    print(f"wrote {Path(args.out) / 'index.html'} and {Path(args.out) / 'results.json'}")
    return 0


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # torchrun and accelerate launch set RANK per process


def _mean_tail(values: list[float], n: int = 50) -> float:
    tail = values[-n:]
    return sum(tail) / max(len(tail), 1)


if __name__ == "__main__":
    sys.exit(main())
