"""Quality per CPU minute: digit accuracy and digit-FID (minild.evaluation.metrics' evaluator) of the
default digit model after 2, 5 and 10 minutes of training, next to the seeds' Lab 2.6.1 recipe
trained the same minutes. Both are sampled the same way (DDIM-50, classifier-free guidance at
scales 1, 1.5 and 3), and compared at the scale that gives each its lowest digit-FID. Prints
Markdown tables.

    python benchmarks/bench_quality.py --minutes 2 5 10   # about 45 minutes
    python benchmarks/bench_quality.py --quick            # a minute or two: checks that it runs
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import minild
from _common import (
    add_device_argument,
    count_parameters,
    default_config,
    device_line,
    machine_line,
    markdown_table,
    peak_rss_mib,
    seed_recipe_config,
)
from minild.data import load_dataset
from minild.evaluation.metrics import classify, digit_features, frechet_distance, load_digit_classifier, mean_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds of training, few digits: checks the script runs")
    parser.add_argument("--minutes", type=float, nargs="+", default=[2, 5, 10], help="training-time marks")
    parser.add_argument("--per-class", type=int, default=100, help="digits sampled per class and scale")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 3.0],
                        help="guidance scales (1 = plain conditional)")
    add_device_argument(parser)
    args = parser.parse_args()
    minutes, per_class, steps = ([0.02, 0.04], 2, 2) if args.quick else (sorted(args.minutes), args.per_class, args.steps)

    default = default_config()
    target = count_parameters(minild.Pipeline.from_config(default).model)
    recipes = {"minild default (digits_class_cfg)": default, "seed recipe (Lab 2.6.1)": seed_recipe_config(target, num_classes=10)}

    classifier = load_digit_classifier()
    reference = digit_features(classifier, (load_dataset("digits", split="test").images + 1) / 2)
    dataset = load_dataset("digits", split="train")
    rows, best = [], []
    for name, config in recipes.items():
        config["train"]["device"] = args.device  # training and generate() run there
        pipe = minild.Pipeline.from_config(config)
        snapshots = train_with_snapshots(pipe, dataset, minutes)
        for snapshot in snapshots:
            pipe.model.load_state_dict(snapshot["model"])
            if snapshot["ema"] is not None:
                pipe.ema_model.load_state_dict(snapshot["ema"])
            scores = [score(pipe, classifier, reference, per_class, steps, scale) for scale in args.scales]
            rows.append([name, f"{snapshot['minutes']:g}", snapshot["step"], f"{snapshot['images']:,}",
                         *[f"{accuracy:.1%} / {fid:.1f}" for accuracy, fid in scores]])
            # The guidance scale that suits a recipe depends on how far it has trained: compare
            # each at its own best digit-FID.
            (accuracy, fid), scale = min(zip(scores, args.scales), key=lambda pair: pair[0][1])
            best.append([name, f"{snapshot['minutes']:g}", f"{scale:g}", f"{accuracy:.1%}", f"{fid:.1f}"])

    title = "quick check, not a measurement" if args.quick else "measured"
    print(f"## Digit quality per training minute ({title})\n")
    print(f"{machine_line()}, {device_line(args.device)}; {10 * per_class} digits per cell (DDIM-{steps}, seed 0), digit-FID against the "
          f"500 held-out digits; seed recipe: base_channels {recipes['seed recipe (Lab 2.6.1)']['model']['base_channels']}, "
          "cosine, batch 128, AdamW 3e-4, no EMA, class embedding with p_uncond 0.1.\n")
    print(markdown_table(["recipe", "minutes", "steps", "images seen",
                          *[f"accuracy / FID at scale {s:g}" for s in args.scales]], rows))
    print("\nEach recipe at the scale with its lowest digit-FID:\n")
    print(markdown_table(["recipe", "minutes", "scale", "accuracy", "digit-FID"], best))
    print(f"\nPeak RSS: {peak_rss_mib():.0f} MiB")


class Snapshots:
    """A trainer-hook plugin: copies the weights (and EMA weights) when the training time passes
    each mark, and stops the run at the last one. Its own copying time is not counted."""

    def __init__(self, minutes: list[float]):
        self.marks = list(minutes)
        self.taken: list[dict] = []

    @minild.hookimpl
    def minild_train_start(self, trainer):
        self.start, self.excluded = time.perf_counter(), 0.0

    @minild.hookimpl
    def minild_train_step_end(self, trainer, step, batch_size):
        elapsed = (time.perf_counter() - self.start - self.excluded) / 60
        if not self.marks or elapsed < self.marks[0]:
            return
        copying = time.perf_counter()
        ema = trainer.pipeline.ema_model
        self.taken.append({
            "minutes": self.marks.pop(0), "step": step, "images": step * batch_size,
            "model": copy.deepcopy(trainer.model.state_dict()),
            "ema": copy.deepcopy(ema.state_dict()) if ema is not None else None,
        })
        self.excluded += time.perf_counter() - copying
        if not self.marks:
            trainer.request_stop("last time mark")


def train_with_snapshots(pipe: minild.Pipeline, dataset, minutes: list[float]) -> list[dict]:
    snapshots = Snapshots(minutes)
    name = minild.register_plugin(snapshots, name="bench-quality-snapshots")
    try:
        pipe.train(dataset, max_steps=None, epochs=None, max_minutes=2 * max(minutes) + 1)  # stopped at the last mark
    finally:
        minild.unregister_plugin(name)
    return snapshots.taken


def score(pipe, classifier, reference, per_class: int, steps: int, scale: float) -> tuple[float, float]:
    labels = torch.arange(10).repeat(per_class)
    images = pipe.generate(class_labels=labels, guidance="cfg", guidance_scale=scale, num_inference_steps=steps,
                           sampler={"name": "ddim", "eta": 0.0}, seed=0)
    return mean_accuracy(classify(classifier, images), labels), frechet_distance(digit_features(classifier, images), reference)


if __name__ == "__main__":
    main()
