"""The argument parser: one subparser per subcommand, each pointing at its function."""

from __future__ import annotations

import argparse

from minild.cli.arguments import (
    GUIDANCE_HELP,
    GUIDANCE_SCALE,
    RUN_GUIDANCE_HELP,
    float_list,
    guidance_specs,
    int_list,
    str_list,
)
from minild.cli.sample import edit_digits as run_edit_digits
from minild.cli.sample import experiment as run_experiment
from minild.cli.sample import lab_sdxl as run_lab_sdxl
from minild.cli.sample import list_plugins as run_plugins
from minild.cli.sample import sample as run_sample
from minild.cli.train import distill as run_distill
from minild.cli.train import train as run_train
from minild.cli.train import train_vae as run_train_vae


def build_parser() -> argparse.ArgumentParser:
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
    train.set_defaults(run=run_train)

    train_vae = commands.add_parser("train-vae", help="train a VAE stage for latent diffusion and save it")
    train_vae.add_argument("config", help="YAML config with vae, data and train sections (see configs/digits_vae.yaml)")
    train_vae.add_argument("--out", default=None, help="directory to save the VAE into (default: runs/<config name>)")
    train_vae.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    train_vae.add_argument("--max-minutes", type=float, default=None, help="stop after M minutes of training")
    train_vae.add_argument("--device", default=None, help="auto, cpu, cuda or mps (default: from the config)")
    train_vae.set_defaults(run=run_train_vae)

    distill = commands.add_parser("distill", help="distil a guided class-conditional run into a few-step student "
                                  "that takes the guidance scale as an input (docs/distillation.md)")
    distill.add_argument("run_dir", help="the teacher: a saved class-conditional run trained with train.p_uncond > 0")
    distill.add_argument("--out", required=True, help="the student's run directory")
    distill.add_argument("--steps", type=int, default=4, help="the student's sampling steps, a power of two (default 4)")
    distill.add_argument("--max-minutes", type=float, default=None,
                         help="time budget of the whole distillation, split evenly between its phases")
    distill.add_argument("--resume", action="store_true", help="continue --out from its newest checkpoint")
    distill.add_argument("--phase-iterations", type=int, default=None,
                         help="optimizer steps per phase (default 400; --max-minutes may end a phase sooner)")
    distill.add_argument("--batch-size", type=int, default=None, help="images per optimizer step (default 64)")
    distill.add_argument("--max-steps", type=int, default=None,
                         help="stop after N optimizer steps in all (resumable with --resume)")
    distill.add_argument("--device", default=None, help="auto, cpu, cuda or mps (default: the run's)")
    distill.set_defaults(run=run_distill)

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
    sample.add_argument("--image", nargs="+", default=None, metavar="PNG",
                        help="edit these images instead of sampling from noise (used in turn for the --num images; "
                             "see docs/editing.md)")
    sample.add_argument("--strength", type=float, default=None,
                        help="with --image: how far into the noise to go, 0–1 (1 = from noise, default)")
    sample.add_argument("--mask", default=None, metavar="PNG",
                        help="with --image: inpaint where this grayscale mask is white (>= 0.5), keep the rest")
    sample.add_argument("--jump-length", type=int, default=10, help="with --mask: RePaint jump length")
    sample.add_argument("--jump-n-sample", type=int, default=1,
                        help="with --mask: RePaint resamplings per jump (1 = none)")
    sample.set_defaults(run=run_sample)

    listing = commands.add_parser("plugins", help="list registered stages and the plugins that provide them")
    listing.set_defaults(run=run_plugins)

    experiment = commands.add_parser("experiment", help="score a saved digit run with the digit classifier")
    experiments = experiment.add_subparsers(dest="experiment", required=True)
    cfg = experiments.add_parser("cfg-digits", help="class accuracy and digit-FID across guidance scales")
    cfg.add_argument("run_dir", help="a saved class-conditional digit run")
    cfg.add_argument("--methods", type=guidance_specs, nargs="+", default=None, metavar="NAME[:k=v,…]",
                     help="guidance methods to compare, comma-separated, each with optional parameters, e.g. "
                          "cfg,cfg_interval:sigma_low=0.3,apg (default: the run's configured guidance)")
    cfg.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0, 5.0, 7.5],
                     help=GUIDANCE_HELP + "; each method is run at every scale")
    cfg.add_argument("--per-class", type=int, default=100, help="images per digit, method and scale")
    cfg.add_argument("--sampler", default=None, help="sampler name (default: the run's sampler)")
    cfg.add_argument("--steps", type=int, default=None, help="number of inference steps (default: the pipeline's)")
    cfg.add_argument("--seed", type=int, default=0)
    cfg.add_argument("--batch-size", type=int, default=200, help="images per generate() call")
    cfg.add_argument("--beside", metavar="RUN_DIR", default=None,
                     help="also score RUN_DIR (with its own sampler and steps) and plot both frontiers; default for "
                          "a distilled student: its teacher")
    cfg.add_argument("--out", default=None, help="output folder (default: RUN_DIR/cfg_digits)")
    cfg.set_defaults(run=run_experiment)
    prompt = experiments.add_parser("prompt-digits", help="how often each prompt yields its digit")
    prompt.add_argument("run_dir", help="a saved text-conditioned digit run")
    prompt.add_argument("--prompts-file", default=None, help="YAML mapping digit → list of prompts "
                        "(default: 'a handwritten digit seven', '7', 'seven' for every digit)")
    prompt.add_argument("--per-prompt", type=int, default=20, help="images per prompt")
    prompt.add_argument("--methods", type=guidance_specs, nargs="+", default=None, metavar="NAME[:k=v,…]",
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
    prompt.set_defaults(run=run_experiment)
    edit = experiments.add_parser("edit-digits", help="inpainting and SDEdit of held-out digits towards their class "
                                  "and another one, scored with the digit classifier (docs/editing.md)")
    edit.add_argument("run_dir", help="a saved class-conditional digit run")
    edit.add_argument("--per-class", type=int, default=10, help="held-out digits per class, edited in every cell")
    edit.add_argument("--strengths", type=float_list, default=[0.2, 0.4, 0.6, 0.8, 1.0],
                      help="comma-separated SDEdit strengths in [0, 1], e.g. 0.2,0.4,0.6,0.8,1")
    edit.add_argument("--regions", type=str_list, default=["lower", "upper", "box"],
                      help="comma-separated inpainting regions: lower, upper (halves), box (a random 14x14 square)")
    edit.add_argument("--guidance-scale", type=float, default=None, help=RUN_GUIDANCE_HELP)
    edit.add_argument("--steps", type=int, default=None, help="number of inference steps (default: the pipeline's)")
    edit.add_argument("--sampler", default=None, help="sampler name: ddpm, ddim or dpm_solver_pp (default: the run's)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--batch-size", type=int, default=200, help="images per generate() call")
    edit.add_argument("--out", default=None, help="output folder (default: RUN_DIR/edit_digits)")
    edit.set_defaults(run=run_edit_digits)

    lab = commands.add_parser("lab", help="prompt labs on pretrained diffusers models")
    labs = lab.add_subparsers(dest="lab", required=True)
    sdxl = labs.add_parser("sdxl", help="every prompt × guidance × seed with an SDXL model: PNGs, sheets, index.html")
    sdxl.add_argument("--model", required=True, help="SDXL pipeline directory (save_pretrained) or hub id")
    prompts = sdxl.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    prompts.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line (# comments)")
    sdxl.add_argument("--negative", default=None, help="negative prompt for every image")
    sdxl.add_argument("--guidance", type=float_list, default=[5.0],
                      help="comma-separated guidance scales, diffusers' convention (1 = none), e.g. 3,5,7.5")
    sdxl.add_argument("--steps", type=int, default=30, help="number of inference steps")
    sdxl.add_argument("--seeds", type=int_list, default=[0], help="comma-separated seeds, e.g. 0,1,2")
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
    sdxl.add_argument("--memory", type=str_list, default=[],
                      help="comma-separated: model_cpu_offload, vae_slicing, vae_tiling, attention_slicing")
    sdxl.add_argument("--refiner", default=None, help="SDXL refiner directory or hub id (finishes each image)")
    sdxl.add_argument("--refiner-start", type=float, default=0.8,
                      help="fraction of the schedule the base model runs before the refiner takes over")
    sdxl.add_argument("--batch-size", type=int, default=4, help="seeds generated together")
    sdxl.add_argument("--image", default=None, help="PNG/JPEG to edit (img2img, SDEdit), stretched to --size")
    sdxl.add_argument("--mask", default=None, help="L-mode PNG of --image's size: white = regenerate (inpainting)")
    sdxl.add_argument("--strength", type=float, default=None,
                      help="fraction of the schedule to redo, int(steps*strength) steps (default 0.6, 1 with --mask)")
    sdxl.set_defaults(run=run_lab_sdxl)
    return parser
