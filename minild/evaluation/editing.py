"""The edit-digits experiment: held-out digits inpainted (lower half, upper half, a random box) and
edited with SDEdit towards their own class and another one, scored with the digit classifier."""

from __future__ import annotations

from numbers import Real
from pathlib import Path
from typing import Callable, Sequence

import torch

from minild.data import load_dataset
from minild.evaluation import experiments
from minild.evaluation.experiments import NUM_DIGITS
from minild.evaluation.frontier import sampler_name, save_png
from minild.evaluation.metrics import DigitClassifier, classify, load_digit_classifier
from minild.images import save_labeled_grid
from minild.pipeline.editing import pixel_shape
from minild.pipeline.grids import inference_steps

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
REGIONS = ("lower", "upper", "box")
BOX_SIZE = 14  # the random box: BOX_SIZE × BOX_SIZE pixels, anywhere inside the 28 × 28 digit
DIGIT_SHAPE = (1, 28, 28)
CSV_FIELDS = ("kind", "region", "towards", "strength", "steps_run", "num_images", "reads_as_guided",
              "reads_as_original", "mean_abs_diff", "kept_mean_abs_diff", "kept_max_abs_diff")


def run_edit_digits(
    pipeline,
    *,
    per_class: int = 10,
    strengths: Sequence[float] = STRENGTHS,
    regions: Sequence[str] = REGIONS,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    sampler: str | dict | None = None,
    seed: int = 0,
    batch_size: int = 200,
    out_dir: str | Path | None = None,
    classifier: DigitClassifier | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Edit ``per_class`` held-out test digits of every class with ``pipeline.generate`` and score
    the edits with the digit classifier.

    Each digit gets one other class to be edited towards, ``(label + 1 + r) % 10`` with r drawn
    uniformly from 0…8 (a generator seeded with ``seed``), so every ordered pair of digits can occur.
    Inpainting (``generate(image=, mask=, class_labels=)``, strength 1): for each of ``regions`` —
    ``"lower"`` and ``"upper"`` half, ``"box"`` (a 14 × 14 square at a random place per digit, from
    the same generator) — the region is regenerated guided towards the digit's own class
    (``towards="true"``) and towards the other one (``"other"``). SDEdit
    (``generate(image=, strength=, class_labels=)``): the whole digit edited towards the other class
    at each of ``strengths`` in [0, 1] (steps run: ``int(num_inference_steps · strength)``, none at
    0, where the input comes back). ``guidance_scale``, ``num_inference_steps`` and ``sampler``:
    None keeps the pipeline's own. Digits go through ``generate`` in batches of at most
    ``batch_size``; batch i is seeded from ``seed`` and i, so every cell starts from the same noise.

    Returns one dict per cell (inpainting cells first): ``kind`` (``"inpaint"`` or ``"sdedit"``),
    ``region`` (None for SDEdit), ``towards``, ``strength``, ``steps_run``, ``num_images``,
    ``reads_as_guided`` (the classifier reads the class guided towards), ``reads_as_original`` (it
    reads the digit's own class), ``mean_abs_diff`` (mean absolute pixel difference to the input,
    in [0, 1] units: over the regenerated region for inpainting, the whole digit for SDEdit), and for
    inpainting ``kept_mean_abs_diff`` and ``kept_max_abs_diff`` over the kept pixels (0: generate
    pastes them back exactly). With ``out_dir``, writes ``results.md``, ``results.csv``,
    ``plot.png`` and ``grid.png``.
    """
    num_classes = getattr(pipeline.model, "num_classes", None)
    if num_classes != NUM_DIGITS:
        raise ValueError(
            f"the edit-digits experiment needs a class-conditional digit model (model.num_classes = {NUM_DIGITS}); "
            f"this one has num_classes = {num_classes}. Train one with configs/digits_class_cfg.yaml"
        )
    experiments._check_positive(per_class=per_class, batch_size=batch_size)
    if num_inference_steps is not None:
        experiments._check_positive(num_inference_steps=num_inference_steps)
    strengths, regions = check_strengths(strengths), check_regions(regions)
    experiments._check_seed(seed)
    if guidance_scale is not None:
        experiments._check_guidance_scale(guidance_scale, "guidance_scale")
    if tuple(pixel_shape(pipeline)) != DIGIT_SHAPE:
        raise ValueError(f"the edit-digits experiment edits 1×28×28 digits; this pipeline makes "
                         f"{'×'.join(map(str, pixel_shape(pipeline)))} images. Train configs/digits_class_cfg.yaml")
    images, labels = held_out_digits(per_class)
    generator = torch.Generator().manual_seed(seed)
    others = (labels + 1 + torch.randint(NUM_DIGITS - 1, labels.shape, generator=generator)) % NUM_DIGITS  # [N]
    masks = {region: region_masks(region, len(labels), generator) for region in regions}
    if classifier is None:
        classifier = load_digit_classifier()
        if log is not None:
            log(f"digit classifier: {classifier.info['test_accuracy']:.1%} accuracy on the held-out test digits")
    steps = inference_steps(pipeline, num_inference_steps, sampler)
    options = {key: value for key, value in (("guidance_scale", guidance_scale), ("num_inference_steps", num_inference_steps),
                                             ("sampler", sampler)) if value is not None}

    def edit(targets: torch.Tensor, **edit_options) -> torch.Tensor:  # [N, 1, 28, 28] in [0, 1]
        chunks = torch.arange(len(labels)).split(batch_size)
        mask = edit_options.pop("mask", None)
        return experiments._generate_in_batches(
            pipeline, chunks, seed, lambda index: {"image": images[index], "class_labels": targets[index].tolist(),
                                                   **({} if mask is None else {"mask": mask[index]})},
            **edit_options, **options,
        )

    rows, grid_rows = [], {"input": images}
    for region in regions:
        grid_rows[f"{region}: mask"] = mask_overlay(images, masks[region])
        for towards, targets in (("true", labels), ("other", others)):
            edited = edit(targets, mask=masks[region])
            rows.append({"kind": "inpaint", "region": region, "towards": towards, "strength": 1.0, "steps_run": steps,
                         **scores(classifier, edited, images, labels, targets, masks[region])})
            grid_rows[f"{region} → {towards}"] = edited
            _log(log, rows[-1])
    for strength in strengths:
        edited = edit(others, strength=strength)
        rows.append({"kind": "sdedit", "region": None, "towards": "other", "strength": strength,
                     "steps_run": min(int(steps * strength), steps), **scores(classifier, edited, images, labels, others)})
        grid_rows[f"SDEdit {strength:g}"] = edited
        _log(log, rows[-1])
    if out_dir is not None:
        settings = (f"{per_class} held-out digits per class (n = {len(labels)} per cell), "
                    f"{sampler_name(sampler, pipeline)} with {steps} inference steps, guidance scale "
                    f"{'of the config' if guidance_scale is None else f'{guidance_scale:g}'}, seed {seed}")
        write_results(Path(out_dir), rows, grid_rows, labels, others, settings)
    return rows


def check_strengths(strengths: Sequence[float]) -> list[float]:
    if isinstance(strengths, (str, Real)) or not strengths:
        raise ValueError(f"strengths must be a non-empty list of numbers in [0, 1], got {strengths!r}; "
                         "e.g. (0.2, 0.4, 0.6, 0.8, 1.0)")
    for strength in strengths:
        if isinstance(strength, bool) or not isinstance(strength, Real) or not 0 <= strength <= 1:
            raise ValueError(f"strengths must lie in [0, 1] (0 = return the input, 1 = start from noise), "
                             f"got {strength!r}")
    return [float(strength) for strength in strengths]


def check_regions(regions: Sequence[str]) -> list[str]:
    if isinstance(regions, str) or not regions:
        raise ValueError(f"regions must be a non-empty list of {', '.join(REGIONS)}, got {regions!r}")
    for region in regions:
        if region not in REGIONS:
            raise ValueError(f"unknown region {region!r}: the regions are {', '.join(REGIONS)}")
    if len(set(regions)) != len(regions):
        raise ValueError(f"regions names a region twice: {list(regions)}")
    return list(regions)


def held_out_digits(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` test digits of every class, classes interleaved (0, 1, …, 9, 0, …):
    images ``[N, 1, 28, 28]`` in [0, 1] and labels ``[N]``."""
    test = load_dataset("digits", split="test")
    counts = torch.bincount(test.labels, minlength=NUM_DIGITS)
    if per_class > int(counts.min()):
        raise ValueError(f"per_class={per_class} but the held-out test split has only {int(counts.min())} digits of "
                         f"its rarest class: give per_class <= {int(counts.min())}")
    index = torch.stack([torch.nonzero(test.labels == digit).flatten()[:per_class] for digit in range(NUM_DIGITS)])
    index = index.T.flatten()  # [per_class · 10]: classes interleaved
    return experiments._unit(test.images[index]), test.labels[index]


def region_masks(region: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, 1, 28, 28]`` masks, 1 = regenerate: the lower or upper half, or a random box per digit."""
    _, height, width = DIGIT_SHAPE
    masks = torch.zeros(count, *DIGIT_SHAPE)
    if region == "lower":
        masks[:, :, height // 2:] = 1
    elif region == "upper":
        masks[:, :, :height // 2] = 1
    else:
        corners = torch.randint(height - BOX_SIZE + 1, (count, 2), generator=generator)  # [count, (top, left)]
        for mask, (top, left) in zip(masks, corners.tolist()):
            mask[:, top:top + BOX_SIZE, left:left + BOX_SIZE] = 1
    return masks


def scores(classifier, edited, images, labels, targets, mask=None) -> dict:
    """The classifier's reading of ``edited`` and its distance to ``images`` (all ``[N, 1, 28, 28]``)."""
    predicted = classify(classifier, edited)
    difference = (edited - images).abs()  # [N, 1, 28, 28]
    row = {"num_images": len(edited),
           "reads_as_guided": (predicted == targets).double().mean().item(),
           "reads_as_original": (predicted == labels).double().mean().item()}
    if mask is None:
        return {**row, "mean_abs_diff": difference.mean().item(), "kept_mean_abs_diff": None, "kept_max_abs_diff": None}
    kept = difference[mask == 0]
    return {**row, "mean_abs_diff": difference[mask == 1].mean().item(), "kept_mean_abs_diff": kept.mean().item(),
            "kept_max_abs_diff": kept.max().item()}


def mask_overlay(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]``: the digits in gray, the region to regenerate tinted red."""
    rgb = images.expand(-1, 3, -1, -1).clone()
    rgb[:, 0] = torch.maximum(rgb[:, 0], 0.6 * masks[:, 0])
    rgb[:, 1:] *= 1 - 0.4 * masks
    return rgb


def _log(log, row: dict) -> None:
    if log is not None:
        cell = f"inpaint {row['region']} → {row['towards']}" if row["kind"] == "inpaint" else f"SDEdit {row['strength']:g}"
        log(f"{cell}: reads as guided {row['reads_as_guided']:.1%}, as original {row['reads_as_original']:.1%}, "
            f"mean |Δ| {row['mean_abs_diff']:.3f}")


# ---------------------------------------------------------------------------- files


def write_results(out_dir: Path, rows: list[dict], grid_rows: dict, labels, others, settings: str) -> None:
    """``results.md``, ``results.csv``, ``plot.png`` and ``grid.png`` (the first digit of every class)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    experiments._write_text(out_dir / "results.md", format_edit_markdown(rows, settings=settings))
    experiments._write_csv(out_dir / "results.csv", [{field: _rounded(row[field]) for field in CSV_FIELDS} for row in rows])
    sdedit = [row for row in rows if row["kind"] == "sdedit"]
    if sdedit:
        plot_strengths(sdedit, out_dir / "plot.png", title=f"SDEdit towards another digit: {settings}")
    columns = [f"{label}→{other}" for label, other in zip(labels[:NUM_DIGITS].tolist(), others[:NUM_DIGITS].tolist())]
    grid = torch.stack([batch[:NUM_DIGITS].expand(-1, 3, -1, -1) for batch in grid_rows.values()])  # [R, 10, 3, 28, 28]
    save_labeled_grid(grid, out_dir / "grid.png", row_labels=list(grid_rows), column_labels=columns,
                      title=f"columns: digit → the other class · {settings}")


def _rounded(value):
    return round(value, 6) if isinstance(value, float) else value


def format_edit_markdown(rows: list[dict], *, settings: str = "") -> str:
    """The two tables: inpainting (region × towards) and SDEdit (strength), with their legend."""
    lines = [
        "# Editing digits",
        "",
        "Held-out test digits, each with one other class drawn for it: (label + 1 + r) mod 10, r uniform in "
        "0…8. Reads as guided: the digit classifier reads the class the edit was guided towards (the digit's "
        "own for 'true'); reads as original: it reads the digit's own class. Mean |Δ|: mean absolute pixel "
        "difference to the input, pixels in [0, 1]." + (f" {settings}." if settings else ""),
        "",
        "## Inpainting",
        "",
        f"The region (lower or upper half, a random {BOX_SIZE}×{BOX_SIZE} box) regenerated from noise "
        "(strength 1); mean |Δ| over the region, kept |Δ| over the other pixels (0: generate pastes them back).",
        "",
        "| region | towards | n | reads as guided | reads as original | mean \\|Δ\\| in region | kept mean \\|Δ\\| "
        "| kept max \\|Δ\\| |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in (row for row in rows if row["kind"] == "inpaint"):
        lines.append(f"| {row['region']} | {row['towards']} | {row['num_images']} | {row['reads_as_guided']:.1%} | "
                     f"{row['reads_as_original']:.1%} | {row['mean_abs_diff']:.4f} | {row['kept_mean_abs_diff']:.4g} | "
                     f"{row['kept_max_abs_diff']:.4g} |")
    lines += [
        "",
        "## SDEdit towards the other class",
        "",
        "The whole digit noised to the step the strength selects and denoised guided towards the other class "
        "(steps run: int(steps × strength); strength 0 returns the input). Class change: reads as the other class.",
        "",
        "| strength | steps run | n | class change | reads as original | mean \\|Δ\\| |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in (row for row in rows if row["kind"] == "sdedit"):
        lines.append(f"| {row['strength']:g} | {row['steps_run']} | {row['num_images']} | {row['reads_as_guided']:.1%} | "
                     f"{row['reads_as_original']:.1%} | {row['mean_abs_diff']:.4f} |")
    lines += ["", "`grid.png`: one column per digit 0–9 (its label → the other class); rows: the input, each region's "
              "mask (red) and its inpainting towards the true and the other class, SDEdit at each strength. "
              "`plot.png`: class change and mean |Δ| against strength.", ""]
    return "\n".join(lines)


def plot_strengths(rows: list[dict], path: str | Path, *, title: str = "") -> None:
    """``plot.png``: left, the rates the edits read as the other class and as the original against
    strength; right, the mean absolute pixel difference to the input against strength."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    strengths = [row["strength"] for row in rows]
    figure = Figure(figsize=(11, 4.4), dpi=100)
    FigureCanvasAgg(figure)
    rates, distance = figure.subplots(1, 2)
    rates.plot(strengths, [row["reads_as_guided"] for row in rows], "o-", label="class change (reads as the other class)")
    rates.plot(strengths, [row["reads_as_original"] for row in rows], "s--", label="still reads as the original")
    rates.set(xlabel="strength", ylabel="rate", ylim=(-0.02, 1.02), title="what the classifier reads")
    rates.yaxis.set_major_formatter(PercentFormatter(1.0))
    rates.legend(fontsize=8)
    distance.plot(strengths, [row["mean_abs_diff"] for row in rows], "o-", color="tab:red")
    distance.set(xlabel="strength", ylabel="mean |edit − input| (pixels in [0, 1])", title="distance to the input")
    for axes in (rates, distance):
        axes.grid(True, alpha=0.25)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    save_png(figure, path)
