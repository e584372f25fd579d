"""The benchmark scripts run end to end (``--quick``: every code path at tiny sizes, numbers that
mean nothing) and print the tables benchmarks/README.md quotes. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import minild

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "benchmarks"


def run_script(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), "--quick", "--device", "cpu", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quick check, not a measurement" in result.stdout
    return result.stdout


def table_rows(output: str, header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with ``header``."""
    lines = output.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_bench_train_times_every_variant_and_profiles_the_step():
    output = run_script("bench_train.py", "--widths", "16")
    variants = [row[0] for row in table_rows(output, "| variant |")]
    assert variants == [
        "minild Pipeline.train", "hand-written loop, same model", "seed recipe (Lab 2.6.1), hand-written",
        "hand-written loop, base_channels 16", "fp32 matmul 2048²",
    ]
    shares = {row[0]: float(row[1].rstrip("%")) for row in table_rows(output, "| ops |")}
    assert shares["convolutions (forward and backward)"] > 0
    assert 95 <= sum(shares.values()) <= 105  # the kinds cover the whole step (rounded shares)


def test_bench_sample_compares_the_samplers_and_measures_a_thousand_digits():
    output = run_script("bench_sample.py")
    rows = {row[0]: row for row in table_rows(output, "| sampler |")}
    assert "diffusers DDIMScheduler, two passes, 5 steps" in rows
    assert float(rows["minild DDIM, one batched pass, 5 steps"][-1]) < 1e-4  # the same images as diffusers' loop
    thousand = table_rows(output, "| generate(batch_size=…) |")
    assert [row[0] for row in thousand] == ["64", "128", '"auto" (64)', "None (one batch)"]
    assert all(float(row[3]) > 0 for row in thousand)


def test_bench_quality_scores_both_recipes_at_each_mark():
    output = run_script("bench_quality.py")
    rows = table_rows(output, "| recipe |")
    assert len(rows) == 2 * 2  # two recipes, two time marks
    assert all("%" in cell for row in rows for cell in row[4:])
    assert len(table_rows(output, "| recipe | minutes | scale |")) == 4


@pytest.fixture
def trained_run(tmp_path):
    pipe = minild.Pipeline.from_config(ROOT / "configs" / "digits_class_cfg.yaml")
    pipe.train(max_steps=2, max_minutes=None, hooks=["ema"])
    pipe.save_pretrained(tmp_path / "run")
    return tmp_path / "run"


def test_bench_steps_scores_ddim_and_dpm_solver_on_a_saved_run(trained_run):
    output = run_script("bench_steps.py", "--run", str(trained_run))
    samplers = [row[0] for row in table_rows(output, "| sampler |")]
    assert samplers[0] == "ddim" and set(samplers[1:]) == {"dpm_solver_pp"}


def test_bench_distill_distills_and_scores_every_halving_against_the_teacher(trained_run):
    output = run_script("bench_distill.py", "--run", str(trained_run))
    models = [row[0] for row in table_rows(output, "| model |")]
    assert models == ["teacher (its defaults)", "student, 2 steps", "student, 1 steps"]
