"""How few DPM-Solver++(2M) steps reach DDIM-50's quality: digit accuracy and digit-FID
(minild.evaluation.metrics) of a trained class-conditional run at a few guidance scales, DDIM-50 against
DPM-Solver++ at several step counts, from the same initial noise. Prints a Markdown table.

    python benchmarks/bench_steps.py --run RUN_DIR          # about 5 minutes for 50 digits per class
    python benchmarks/bench_steps.py --run RUN_DIR --quick  # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import time

import minild
from _common import add_device_argument, device_line, machine_line, markdown_table
from minild.config import StageSpec
from minild.evaluation.experiments import run_cfg_digits
from minild.evaluation.metrics import load_digit_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a trained class-conditional digit run (minild train --out)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 8, 10, 15, 20], help="DPM-Solver++ step counts")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 3.0], help="guidance scales")
    parser.add_argument("--per-class", type=int, default=50, help="digits per class and cell")
    parser.add_argument("--quick", action="store_true", help="2 digits per class, 2 step counts")
    add_device_argument(parser)
    args = parser.parse_args()
    per_class, step_counts = (2, args.steps[:2]) if args.quick else (args.per_class, args.steps)

    pipe = minild.Pipeline.from_pretrained(args.run)
    pipe.config.train.device = args.device  # generate() runs there
    classifier = load_digit_classifier()
    rows = []
    for name, steps in [("ddim", 50), *[("dpm_solver_pp", n) for n in step_counts]]:
        pipe.sampler = pipe._build_sampler(StageSpec(name=name))
        start = time.perf_counter()
        scored = run_cfg_digits(
            pipe, methods=["cfg"], guidance_scales=args.scales, per_class=per_class, num_inference_steps=steps, classifier=classifier,
        )
        rows.append([name, steps, f"{time.perf_counter() - start:.1f}",
                     *[f"{row['mean_accuracy']:.1%} / {row['digit_fid']:.1f}" for row in scored]])

    title = "quick check, not a measurement" if args.quick else "measured"
    print(f"## Few-step sampling quality ({title})\n")
    print(f"{machine_line()}, {device_line(args.device)}; run {args.run}; {10 * per_class} digits per cell, seed 0 (the same noise for "
          "every sampler); digit-FID against the 500 held-out digits; seconds for all scales.\n")
    print(markdown_table(["sampler", "steps", "seconds", *[f"accuracy / FID at scale {s:g}" for s in args.scales]],
                         rows))


if __name__ == "__main__":
    main()
