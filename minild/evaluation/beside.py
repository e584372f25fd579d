"""cfg-digits of a run beside another's (a distilled student beside its teacher): both frontiers
in one results.md and one frontier.png, each method named with the run it comes from."""

from __future__ import annotations

from pathlib import Path

from minild.data import load_dataset
from minild.evaluation.experiments import format_cfg_markdown, real_digits_baseline, run_cfg_digits
from minild.evaluation.frontier import plot_frontier
from minild.evaluation.metrics import digit_features, load_digit_classifier
from minild.io import atomic_write
from minild.pipeline.grids import inference_steps


def run_cfg_digits_beside(pipeline, other, *, out_dir: str | Path, name: str, other_name: str, classifier=None,
                          num_inference_steps: int | None = None, sampler: str | dict | None = None, log=None,
                          **common) -> list[dict]:
    """``run_cfg_digits`` on ``pipeline`` (its grid and CSV into ``out_dir``), then on ``other`` with
    its own sampler and steps; ``out_dir/results.md`` and ``frontier.png`` then hold both, the
    methods named ``"apg · NAME"``. ``common``: methods, guidance_scales, per_class, seed, batch_size."""
    classifier = classifier if classifier is not None else load_digit_classifier()
    first = run_cfg_digits(pipeline, out_dir=out_dir, classifier=classifier, num_inference_steps=num_inference_steps,
                           sampler=sampler, log=log, **common)
    second = run_cfg_digits(other, classifier=classifier, log=log, **common)
    rows = [{**row, "method": f"{row['method']} · {label}"}
            for label, part in ((name, first), (other_name, second)) for row in part]
    reference = digit_features(classifier, (load_dataset("digits", split="test").images + 1) / 2)
    baseline = real_digits_baseline(classifier, rows[0]["num_images"], reference)
    settings = (f"{name}: {inference_steps(pipeline, num_inference_steps, sampler)} steps, {other_name}: "
                f"{inference_steps(other)} steps, {rows[0]['num_images']} digits per cell")
    out_dir = Path(out_dir)
    text = format_cfg_markdown(rows, settings=settings, baseline=baseline)
    atomic_write(out_dir / "results.md", lambda tmp: Path(tmp).write_text(text))
    plot_frontier(rows, baseline, out_dir / "frontier.png", title=f"Guidance frontier: {settings}")
    return rows
