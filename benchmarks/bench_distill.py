"""A few-step student against its teacher: distil a trained guided class-conditional digit run
(``Pipeline.distill``, docs/distillation.md) within a time budget, then score 1,000 digits from the
student after every halving (1, 2, 4, 8 steps) and from the teacher's defaults (its sampler, steps and
guidance): accuracy, digit-FID beside the real-digit floor at the same n, seconds, and the speed-up.

    python benchmarks/bench_distill.py --run runs/digits_class_cfg --out runs/digits_student  # ≈ 15 min + scoring
    python benchmarks/bench_distill.py --run RUN_DIR --out STUDENTS --max-minutes 5 10 15    # the curve: 30 min + scoring
    python benchmarks/bench_distill.py --run RUN_DIR --quick   # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import minild
from _common import add_device_argument, device_line, machine_line, markdown_table
from minild.evaluation.experiments import run_cfg_digits
from minild.evaluation.metrics import load_digit_classifier
from minild.training.distill import PHASES_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the teacher: a trained class-conditional run (minild train --out)")
    parser.add_argument("--out", default=None, help="the student's directory (default: a temporary one)")
    parser.add_argument("--max-minutes", type=float, nargs="+", default=[15.0],
                        help="distillation budgets (all phases); several: one student each, in OUT/M-min, the curve")
    parser.add_argument("--steps", type=int, default=1, help="distil down to this many steps (each halving is scored)")
    parser.add_argument("--skip-distill", action="store_true", help="score the students already in --out")
    parser.add_argument("--per-class", type=int, default=100, help="digits per class and row (100: 1,000 digits)")
    parser.add_argument("--quick", action="store_true", help="a tiny distillation, 2 digits per class")
    add_device_argument(parser)
    args = parser.parse_args()
    per_class = 2 if args.quick else args.per_class
    root = Path(args.out or tempfile.mkdtemp(prefix="minild-student-"))
    budgets = [None] if args.quick else args.max_minutes

    teacher = minild.Pipeline.from_pretrained(args.run)
    classifier = load_digit_classifier()
    scale = teacher.guidance.scale if teacher.guidance is not None else 1.0

    def score(pipe) -> dict:
        pipe.config.train.device = args.device  # generate() runs there
        pipe.generate(class_labels=list(range(10)), guidance_scale=scale, seed=0)  # warm-up: first-call costs untimed
        return run_cfg_digits(pipe, methods=None, guidance_scales=[scale], per_class=per_class, classifier=classifier)[0]

    reference = score(teacher)
    rows = [["teacher (its defaults)", "—", f"{teacher.config.sampler.name}, "
             f"{reference['model_evaluations_per_image']:g} evaluations", *cells(reference, reference)]]
    spent = []
    for budget in budgets:
        out = root if len(budgets) == 1 else root / f"{budget:g}-min"
        if not args.skip_distill:
            options = ({"start_steps": 4, "phase_iterations": 2, "batch_size": 8} if args.quick
                       else {"max_minutes": budget})
            start = time.perf_counter()
            teacher.distill(out, steps=args.steps, device=args.device, resume=(out / "checkpoints").is_dir(), **options)
            spent.append(f"{(time.perf_counter() - start) / 60:.1f} min")
        for steps, path in sorted(((int(p.name.split("-")[1]), p) for p in (out / PHASES_DIR).glob("steps-*")),
                                  reverse=True):
            row = score(minild.Pipeline.from_pretrained(path))
            rows.append([f"student, {steps} steps", "quick" if budget is None else f"{budget:g} min",
                         f"distilled, {row['model_evaluations_per_image']:g} evaluations", *cells(row, reference)])

    title = "quick check, not a measurement" if args.quick else "measured"
    print(f"## Distilled students against the teacher ({title})\n")
    took = f"; the distillations took {', '.join(spent)}" if spent else ""
    print(f"{machine_line()}, {device_line(args.device)}; teacher {args.run}, students in {root}{took}; "
          f"{10 * per_class} digits per row at guidance scale {scale:g}, seed 0; digit-FID against the 500 held-out "
          "digits, beside the real-digit floor at the same n; speed-up = teacher's seconds / row's seconds.\n")
    print(markdown_table(["model", "budget", "sampling", "accuracy", "digit-FID", "FID / floor", "seconds", "speed-up"],
                         rows))


def cells(row: dict, reference: dict) -> list[str]:
    return [f"{row['mean_accuracy']:.1%}", f"{row['digit_fid']:.2f}", f"{row['digit_fid'] / row['floor_digit_fid']:.2f}×",
            f"{row['seconds']:.1f}", f"{reference['seconds'] / row['seconds']:.1f}×"]


if __name__ == "__main__":
    main()
