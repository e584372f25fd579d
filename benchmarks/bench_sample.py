"""Sampling speed on a CPU (or on ``--device cuda``): 100 class-conditional digits with
classifier-free guidance (scale 3) from the default digit model, minild's samplers against the
common hand-written diffusers loop; and the time and peak memory of 1,000 guided digits. Prints a Markdown table.

    python benchmarks/bench_sample.py                 # about 15 minutes
    python benchmarks/bench_sample.py --run RUN_DIR   # a trained run instead of fresh weights
    python benchmarks/bench_sample.py --quick         # under a minute: checks that it runs
    python benchmarks/bench_sample.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import torch

import minild
from _common import (
    add_device_argument,
    default_config,
    device_line,
    forward_flops,
    machine_line,
    markdown_table,
    median,
    peak_rss_mib,
    synchronize,
)
from minild.pipeline.guidance import cfg_model_fn
from minild.devices import resolve_batch_size

GUIDANCE_SCALE = 3.0  # plain CFG (guidance="cfg"), as the hand-written diffusers loop it is compared with
GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few images and steps, to check the script runs")
    parser.add_argument("--run", help="a saved pipeline (minild train --out RUN_DIR); default: the default "
                                      "config's untrained model, which costs the same per step")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (DDPM-1000 runs in the first only)")
    parser.add_argument("--thousand", metavar="BATCH_SIZE", help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--steps", type=int, default=50, help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    pipe = minild.Pipeline.from_pretrained(args.run) if args.run else minild.Pipeline.from_config(default_config())
    pipe.config.train.device = args.device  # generate() runs there
    if args.thousand is not None:
        batch_size = {"0": None, "auto": "auto"}[args.thousand] if args.thousand in ("0", "auto") else int(args.thousand)
        return sample_thousand(pipe, batch_size, args.steps, device)

    quick = args.quick
    num_images, rounds = (20, 1) if quick else (100, args.rounds)
    ddim_steps, ddpm_steps, dpm_steps = (5, 20, (2, 4)) if quick else (50, 1000, (10, 20))
    labels = torch.arange(10).repeat(num_images // 10)  # [N]: 0, 1, …, 9, 0, …
    latents = torch.randn((num_images, *pipe.image_shape), generator=torch.Generator().manual_seed(0))
    model = (pipe.ema_model if pipe.ema_model is not None else pipe.model).to(device)
    # What generate() does inside (train.channels_last), done by hand to the hand-written loop.
    model_channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def generate(sampler: dict, steps: int, channels_last: bool | None = None):
        def run():
            default, pipe.config.train.channels_last = pipe.config.train.channels_last, channels_last
            try:
                return pipe.generate(class_labels=labels, guidance="cfg", guidance_scale=GUIDANCE_SCALE,
                                     num_inference_steps=steps, sampler=sampler, latents=latents.clone())
            finally:
                pipe.config.train.channels_last = default
        return run

    variants = {  # name: (run, forward passes per step, images per forward, rounds)
        f"diffusers DDIMScheduler, two passes, {ddim_steps} steps": (
            lambda: diffusers_two_pass_ddim(pipe, model, labels, latents, ddim_steps), 2, num_images, rounds),
        f"diffusers DDIMScheduler, two passes, model in channels_last, {ddim_steps} steps": (
            lambda: diffusers_two_pass_ddim(pipe, model_channels_last, labels, latents, ddim_steps), 2, num_images,
            rounds),
        f"minild DDIM, two passes, {ddim_steps} steps": (
            lambda: minild_two_pass(pipe, model, labels, latents, ddim_steps), 2, num_images, rounds),
        f"minild DDIM, one batched pass, {ddim_steps} steps": (
            generate({"name": "ddim", "eta": 0.0}, ddim_steps), 1, 2 * num_images, rounds),
        f"minild DDPM, one batched pass, {ddpm_steps} steps": (
            generate({"name": "ddpm"}, ddpm_steps), 1, 2 * num_images, 1),
        **({f"minild DDIM, one batched pass, model in channels_last, {ddim_steps} steps": (
            generate({"name": "ddim", "eta": 0.0}, ddim_steps, channels_last=True), 1, 2 * num_images, rounds)}
           if device.type == "cuda" else {}),  # on a CPU generate() runs in channels_last by default
        **{f"minild DPM-Solver++(2M), one batched pass, {n} steps": (
            generate({"name": "dpm_solver_pp"}, n), 1, 2 * num_images, rounds) for n in dpm_steps},
    }
    steps_of = {name: int(name.rsplit(", ", 1)[1].split()[0]) for name in variants}
    import diffusers  # noqa: F401 - imported before the clock starts (the 1,000-digit processes skip it)

    generate({"name": "ddim"}, 2)()  # warm-up
    diffusers_two_pass_ddim(pipe, model, labels[:2], latents[:2], 2)
    seconds, outputs = {name: [] for name in variants}, {}
    for round_index in range(rounds):
        for name, (run, _, _, variant_rounds) in variants.items():
            if round_index < variant_rounds:
                start = time.perf_counter()
                outputs[name] = run().cpu()
                synchronize(device)
                seconds[name].append(time.perf_counter() - start)

    reference = next(iter(variants))
    batched_flops = forward_flops(model, 2 * num_images, pipe.image_shape, num_classes=model.num_classes)
    rows = []
    for name, (_, passes, _, _) in variants.items():
        elapsed = median(seconds[name])
        flops = batched_flops * steps_of[name]  # two half-size passes cost the same FLOPs as one batched one
        same_chain = name.endswith(f", {ddim_steps} steps") and "DDIM" in name
        difference = f"{(outputs[name] - outputs[reference]).abs().max():.1e}" if same_chain else "—"
        rows.append([
            name, passes * steps_of[name], f"{elapsed:.2f}", f"{num_images / elapsed:.1f}",
            f"{median(seconds[reference]) / elapsed:.2f}×", f"{flops / elapsed / 1e9:.1f}", difference,
        ])
    thousand_steps = 1 if quick else 50
    thousand = [thousand_row(args.run, batch_size, thousand_steps, args.device)
                for batch_size in ("64", "128", "auto", "0")]

    title = "quick check, not a measurement" if quick else "measured"
    print(f"## Sampling {num_images} guided digits ({title})\n")
    print(f"{machine_line()}, {device_line(device)}; guidance scale {GUIDANCE_SCALE}; {'trained run ' + args.run if args.run else 'untrained default model'}; "
          f"median of {rounds} interleaved rounds (DDPM: one).\n")
    print(markdown_table(
        ["sampler", "model calls", "seconds", "img/s", f"speed vs first row", "GFLOP/s", "max |Δ| vs first row"], rows,
    ))
    warm = "" if device.type == "cpu" else ", timed after a one-step warm-up call"
    print(f"\n## 1,000 guided digits, DDIM-{thousand_steps}, each in a fresh process{warm}\n")
    headers = ["generate(batch_size=…)", "seconds", "img/s", "peak RSS (MiB)", "under 1 GiB"]
    print(markdown_table(headers + ["peak GPU memory (MiB)"] * (device.type == "cuda"), thousand))
    print(f"\nPeak RSS of this process: {peak_rss_mib():.0f} MiB")


def diffusers_two_pass_ddim(pipe, model, labels, latents, steps) -> torch.Tensor:
    """The loop people write around diffusers: a conditional and an unconditional forward per step."""
    from diffusers import DDIMScheduler  # imported here, so the 1,000-digit processes measure minild alone

    scheduler = DDIMScheduler(
        num_train_timesteps=pipe.schedule.num_timesteps, trained_betas=pipe.schedule.betas.numpy(),
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
        prediction_type="epsilon", thresholding=False,
    )
    device = next(model.parameters()).device
    scheduler.set_timesteps(steps, device=device)
    labels = labels.to(device)
    null = torch.full_like(labels, model.num_classes)
    x = latents.to(device)
    with torch.no_grad():
        for t in scheduler.timesteps:
            t_batch = t.repeat(len(x))
            eps_cond = model(x, t_batch, class_labels=labels)
            eps_uncond = model(x, t_batch, class_labels=null)
            x = scheduler.step(eps_uncond + GUIDANCE_SCALE * (eps_cond - eps_uncond), t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


def minild_two_pass(pipe, model, labels, latents, steps) -> torch.Tensor:
    """minild's DDIM sampler driven by the same two-pass guidance."""
    device = next(model.parameters()).device
    labels, latents = labels.to(device), latents.to(device)
    cond, uncond = cfg_model_fn(model, {"class_labels": labels}, {}, 1.0), cfg_model_fn(
        model, {"class_labels": torch.full_like(labels, model.num_classes)}, {}, 1.0)

    def two_pass(x, t):
        eps_cond, eps_uncond = cond(x, t), uncond(x, t)
        return eps_uncond + GUIDANCE_SCALE * (eps_cond - eps_uncond)

    sampler = minild.create("sampler", "ddim", pipe.schedule, eta=0.0)
    x = sampler.sample(two_pass, tuple(latents.shape), num_inference_steps=steps, latents=latents.clone())
    return ((x + 1) / 2).clamp(0, 1)


def thousand_row(run: str | None, batch_size: str, steps: int, device: str) -> list:
    """Run ``sample_thousand`` in a fresh interpreter, so its peak RSS is its own."""
    command = [sys.executable, __file__, "--thousand", batch_size, "--steps", str(steps), "--device", device]
    if run:
        command += ["--run", run]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    name = {"0": "None (one batch)", "auto": f"\"auto\" ({result['chunk']})"}.get(batch_size, batch_size)
    row = [name, f"{result['seconds']:.2f}", f"{1000 / result['seconds']:.1f}",
           f"{result['peak_rss_mib']:.0f}", "yes" if result["peak_rss_mib"] * 2**20 < GIB else "**no**"]
    return row + [f"{result['peak_device_mib']:.0f}"] if result["peak_device_mib"] is not None else row


def sample_thousand(pipe, batch_size: int | str | None, steps: int, device: torch.device) -> None:
    labels = torch.arange(10).repeat(100)
    chunk = resolve_batch_size(batch_size, len(labels), device, pipe.model.to(device), pipe.image_shape)

    def sample(num_steps):
        pipe.generate(class_labels=labels, guidance="cfg", guidance_scale=GUIDANCE_SCALE, num_inference_steps=num_steps,
                      sampler={"name": "ddim"}, seed=0, batch_size=batch_size, device=str(device))

    if device.type != "cpu":  # the first call loads kernels and picks algorithms for each shape: not timed
        sample(1)
    start = time.perf_counter()
    sample(steps)
    peak_device = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(), "chunk": chunk,
                      "peak_device_mib": peak_device}))


if __name__ == "__main__":
    main()
