"""Training speed on a CPU (or on ``--device cuda``): images/s and achieved GFLOP/s of a training step of the default
digit model (configs/digits_class_cfg.yaml) through ``Pipeline.train``, beside a hand-written
loop of the same model (the pipeline's overhead), the seeds' Lab 2.6.1 recipe, and a large
fp32 matmul (what the machine can do). Prints a Markdown table.

    python benchmarks/bench_train.py            # about 5 minutes
    python benchmarks/bench_train.py --quick    # a few seconds: checks that it runs
    python benchmarks/bench_train.py --device cuda  # on a GPU, with train.compile and bf16 variants
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import minild
from _common import (
    add_device_argument,
    count_parameters,
    default_config,
    device_line,
    machine_line,
    markdown_table,
    matmul_gflops,
    median,
    peak_rss_mib,
    seed_recipe_config,
    synchronize,
    train_step_flops,
)
from minild.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per variant, to check the script runs")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each runs every variant once, interleaved")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per variant and round")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--widths", type=int, nargs="*", default=[64],
                        help="also time the default recipe at these base_channels (wider convolutions run nearer the matmul rate)")
    parser.add_argument("--batch-size", type=int, help="the default config's batch size for its variants "
                        "(default: the config's 64); a big GPU is launch-bound at 64, so try 512 there too")
    add_device_argument(parser)
    args = parser.parse_args()
    device = args.device
    rounds, steps = (2, 3) if args.quick else (args.rounds, args.steps)

    dataset = load_dataset("digits", split="train")
    config = default_config()
    config["train"]["device"] = device
    if args.batch_size:
        config["train"]["batch_size"] = args.batch_size
    pipe = minild.Pipeline.from_config(config)
    num_classes = pipe.model.num_classes
    seed_config = seed_recipe_config(count_parameters(pipe.model))
    seed_config["train"]["device"] = device
    seed_pipe = minild.Pipeline.from_config(seed_config)
    train = pipe.config.train

    same_model = ("minild Pipeline.train", "hand-written loop, same model")
    variants = {
        "minild Pipeline.train": PipelineRun(pipe, dataset),
        "hand-written loop, same model": BareLoop(
            pipe.model, pipe.schedule, dataset, batch_size=train.batch_size, lr=train.lr,
            p_uncond=train.p_uncond, num_classes=num_classes, ema_decay=0.999, device=device,
        ),
        "seed recipe (Lab 2.6.1), hand-written": BareLoop(
            seed_pipe.model, seed_pipe.schedule, dataset, batch_size=seed_pipe.config.train.batch_size,
            lr=seed_pipe.config.train.lr, p_uncond=0.0, num_classes=None, ema_decay=None, device=device,
        ),
    }
    if torch.device(device).type == "cuda":  # the GPU-only levers (layout, train.compile, bf16), on the same pipeline
        variants["Pipeline.train, channels_last"] = PipelineRun(pipe, dataset, channels_last=True)
        variants["Pipeline.train, compile reduce-overhead"] = PipelineRun(pipe, dataset, compile="reduce-overhead")
        variants["Pipeline.train, compile reduce-overhead, contiguous"] = PipelineRun(
            pipe, dataset, compile="reduce-overhead", channels_last=False)
        variants["Pipeline.train, precision bf16"] = PipelineRun(pipe, dataset, precision="bf16")
        variants["Pipeline.train, bf16 + compile reduce-overhead"] = PipelineRun(
            pipe, dataset, precision="bf16", compile="reduce-overhead")
        same_model += tuple(name for name in variants if name.startswith("Pipeline.train, "))
    conditional = set(same_model) | {name for name in variants if name.startswith("Pipeline.train, ")}
    for width in args.widths:
        wide = default_config()
        wide["model"]["base_channels"] = width
        wide["train"]["device"] = device
        wide_pipe = minild.Pipeline.from_config(wide)
        name = f"hand-written loop, base_channels {width}"
        variants[name] = BareLoop(
            wide_pipe.model, wide_pipe.schedule, dataset, batch_size=train.batch_size, lr=train.lr,
            p_uncond=train.p_uncond, num_classes=num_classes, ema_decay=0.999, device=device,
        )
        conditional.add(name)
    flops = {
        name: train_step_flops(run.model, run.batch_size, dataset.image_shape,
                               num_classes=num_classes if name in conditional else None)
        for name, run in variants.items()
    }
    first_step = {}  # warm-up: first-call allocations, kernel selection and torch.compile's compilation
    for name, run in variants.items():
        start = time.perf_counter()
        run(1)
        synchronize(device)
        first_step[name] = time.perf_counter() - start
    seconds = {name: [] for name in variants}
    matmul = []
    for _ in range(rounds):
        for name, run in variants.items():
            seconds[name].append(run(steps) / steps)
        matmul.append(matmul_gflops(args.matmul_size, 1.0 if args.quick else 3.0, device))

    matmul_rate = median(matmul)
    bare = median(seconds["hand-written loop, same model"])
    rows = []
    for name, run in variants.items():
        step = median(seconds[name])
        gflops = flops[name] / step / 1e9
        overhead = f"{100 * (step / bare - 1):+.1f}%" if name in same_model else "—"
        rows.append([
            name, f"{count_parameters(run.model):,}", run.batch_size, f"{run.batch_size / step:.0f}",
            f"{flops[name] / 1e9:.2f}", f"{gflops:.1f}", f"{100 * gflops / matmul_rate:.0f}%", overhead,
            f"{first_step[name]:.1f}",
        ])
    rows.append([f"fp32 matmul {args.matmul_size}²", "—", "—", "—", "—", f"{matmul_rate:.1f}", "100%", "—", "—"])
    print(f"## Training step ({'quick check, not a measurement' if args.quick else 'measured'})\n")
    print(f"{machine_line()}, {device_line(device)}; median of {rounds} interleaved rounds of {steps} steps per variant; "
          f"first step: the one-step warm-up call before them (torch.compile compiles there).\n"
          f"Default model: {pipe.config.model.to_dict()}; seed recipe: base_channels "
          f"{seed_config['model']['base_channels']}, cosine schedule, batch 128, AdamW 3e-4, no EMA.\n")
    print(markdown_table(
        ["variant", "parameters", "batch", "img/s", "GFLOP/step", "GFLOP/s", "of matmul", "vs hand-written",
         "first step (s)"], rows,
    ))
    print(f"\nPeak RSS: {peak_rss_mib():.0f} MiB")

    if torch.device(device).type != "cpu":
        return  # the profile below counts CPU time per op: on an accelerator it would time the launches
    bare_loop = variants["hand-written loop, same model"]
    conv_flops = train_step_flops(bare_loop.model, bare_loop.batch_size, dataset.image_shape,
                                  num_classes=num_classes, only="convolution")
    print(f"\n## Where a step of the default model goes (torch.profiler, {2 if args.quick else 20} steps of the "
          "hand-written loop)\n")
    print(markdown_table(["ops", "share of step", "ms per step", "GFLOP/s", "of matmul"],
                         profile_rows(bare_loop, 2 if args.quick else 20, conv_flops, matmul_rate)))


# Profiler op names → the kind of work they do; the first matching pattern wins.
OP_KINDS = [
    ("convolutions (forward and backward)", ("convolution",)),
    ("GroupNorm (forward and backward)", ("group_norm",)),
    ("SiLU (forward and backward)", ("silu",)),
    ("AdamW, EMA, gradient clipping", ("adam", "lerp", "norm", "foreach", "clamp")),
    ("adds, muls, concatenations, copies", ("add", "mul", "cat", "copy", "sum", "fill", "zero", "where", "sub", "div")),
]


def profile_rows(run: "BareLoop", steps: int, conv_flops: int, matmul_rate: float) -> list[list]:
    """Self CPU time of every op of ``steps`` training steps, by kind, with the convolutions'
    own GFLOP/s: the most the step could reach if everything else took no time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run(steps)
    totals = {kind: 0.0 for kind, _ in OP_KINDS} | {"everything else": 0.0}
    for event in profiler.key_averages():
        name = event.key.lower()
        kind = next((kind for kind, patterns in OP_KINDS if any(p in name for p in patterns)), "everything else")
        totals[kind] += event.self_cpu_time_total / 1e6 / steps  # µs → s per step
    step = sum(totals.values())
    rows = []
    for kind, seconds in totals.items():
        rate = [f"{conv_flops / seconds / 1e9:.1f}", f"{100 * conv_flops / seconds / 1e9 / matmul_rate:.0f}%"] \
            if kind.startswith("convolutions") else ["—", "—"]
        rows.append([kind, f"{100 * seconds / step:.0f}%", f"{1000 * seconds:.1f}", *rate])
    return rows


class PipelineRun:
    """``Pipeline.train`` for a number of steps (hooks of the config but the progress bar)."""

    def __init__(self, pipe: minild.Pipeline, dataset, **overrides):
        self.pipe, self.dataset, self.overrides = pipe, dataset, overrides
        self.model, self.batch_size = pipe.model, pipe.config.train.batch_size

    def __call__(self, steps: int) -> float:
        return self.pipe.train(self.dataset, max_steps=steps, **self.overrides).seconds


class BareLoop:
    """The training step written by hand, as a tutorial does: random batch, condition dropout,
    q(x_t | x_0), eps-MSE, AdamW (fused, as minild), gradient clipping at 1.0, optional EMA; in
    minild's default memory format (channels_last on a CPU, contiguous on a GPU)."""

    def __init__(self, model, schedule, dataset, *, batch_size, lr, p_uncond, num_classes, ema_decay, device="cpu"):
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.model = copy.deepcopy(model).to(self.device, memory_format=self.memory_format).train()
        self.source_model = model
        self.batch_size, self.p_uncond, self.num_classes = batch_size, p_uncond, num_classes
        self.images, self.labels = dataset.images.to(self.device), torch.as_tensor(dataset.labels).to(self.device)
        self.alphas_cumprod = schedule.alphas_cumprod.to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, fused=True)  # as Pipeline.train
        self.ema_decay = ema_decay
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if ema_decay else None

    def __call__(self, steps: int) -> float:
        model, optimizer = self.model, self.optimizer
        start = time.perf_counter()
        for _ in range(steps):
            index = torch.randint(0, len(self.images), (self.batch_size,), device=self.device)
            x0 = self.images[index].contiguous(memory_format=self.memory_format)
            kwargs = {}
            if self.num_classes is not None:
                drop = torch.rand(self.batch_size, device=self.device) < self.p_uncond
                kwargs["class_labels"] = torch.where(drop, self.num_classes, self.labels[index])
            t = torch.randint(0, len(self.alphas_cumprod), (self.batch_size,), device=self.device)
            noise = torch.randn_like(x0)
            alpha_prod = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = alpha_prod.sqrt() * x0 + (1 - alpha_prod).sqrt() * noise
            loss = F.mse_loss(model(x_t, t, **kwargs), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if self.ema is not None:
                torch._foreach_lerp_(list(self.ema.parameters()), list(model.parameters()), 1 - self.ema_decay)
            loss.item()
        return time.perf_counter() - start


if __name__ == "__main__":
    with torch.inference_mode(False):
        main()
