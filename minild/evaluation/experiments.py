"""Experiments that measure a trained digit pipeline with the digit classifier of ``minild.evaluation.metrics``:
class accuracy and digit-FID across guidance scales, and how often a prompt yields its digit.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from numbers import Real
from pathlib import Path
from typing import Callable, Sequence

import torch

from minild.data import DIGIT_WORDS, load_dataset
from minild.evaluation.frontier import (
    check_methods,
    count_model_evaluations,
    guidance_name,
    plot_frontier,
    sampler_name,
)
from minild.evaluation.kid import kernel_inception_distance
from minild.evaluation.metrics import (
    DigitClassifier,
    classify,
    digit_features,
    frechet_distance,
    load_digit_classifier,
    mean_accuracy,
    per_class_accuracy,
)
from minild.images import save_labeled_grid
from minild.io import atomic_write
from minild.pipeline.generation import check_seed
from minild.pipeline.grids import inference_steps

NUM_DIGITS = 10
GUIDANCE_SCALES = (0.0, 1.0, 3.0, 5.0, 7.5)
# Seeds of distinct runs give disjoint batch generators as long as a run has fewer batches than this.
_SEED_STRIDE = 10_000
_SEED_LIMIT = 2**64 // _SEED_STRIDE  # keeps every batch seed in torch's [0, 2**64)


def default_digit_prompts() -> dict[int, list[str]]:
    """Three phrasings per digit: ``"a handwritten digit seven"``, ``"7"``, ``"seven"``."""
    return {digit: [f"a handwritten digit {word}", f"{digit}", word] for digit, word in enumerate(DIGIT_WORDS)}


# ---------------------------------------------------------------------------- guidance sweep


def run_cfg_digits(
    pipeline,
    *,
    methods: Sequence[str | dict] | None = None,
    guidance_scales: Sequence[float] = GUIDANCE_SCALES,
    per_class: int = 100,
    num_inference_steps: int | None = None,
    sampler: str | dict | None = None,
    seed: int = 0,
    batch_size: int = 200,
    out_dir: str | Path | None = None,
    classifier: DigitClassifier | None = None,
    grid_per_class: int = 8,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Sample ``per_class`` digits of every class for each guidance method × scale and score them.

    ``methods``: guidance specs as ``Pipeline.generate`` takes them (a name such as ``"apg"`` or
    ``{"name": "cfg_interval", "sigma_low": 0.3}``); None runs the pipeline's configured
    guidance only. ``guidance_scales`` follow diffusers (and ``generate``, where they override a
    method's own ``scale``): 1.0 is the plain conditional model, 0.0 the unconditional one (its
    accuracy is chance, ~10 %), and the classifier-free-guidance paper's weight is w = scale − 1.
    ``num_inference_steps`` and ``sampler``: None keeps the pipeline's own. Images are drawn in
    batches of at most ``batch_size`` (classes interleaved); batch ``i`` uses a generator seeded
    from ``seed`` and ``i``, so every cell starts from the same noise and reruns repeat exactly.

    Returns one dict per method × scale (methods outer): ``method`` (its name, with parameters as
    on the command line: ``cfg_interval:sigma_low=0.3``), ``guidance_scale``, ``paper_w``,
    ``num_images``, ``mean_accuracy``, ``per_class_accuracy`` (10 floats), ``digit_fid`` and ``kid``
    (against the 500 held-out ``test`` digits; KID in ``minild.evaluation.kid``), ``floor_digit_fid`` and
    ``floor_kid`` (real training digits at the same number of images: ``real_digits_baseline``),
    ``seconds`` (sampling time) and
    ``model_evaluations_per_image`` (images through the eps-model per image, e.g. 100 for 50 steps
    of two-pass guidance; None when the pipeline's model is not a torch module). With ``out_dir``,
    writes ``grid.png`` (rows: digits 0–9; one block of ``grid_per_class`` columns per cell,
    headed "method · scale"), ``results.csv``, ``results.md`` and ``frontier.png``
    (``minild.evaluation.frontier.plot_frontier``).
    """
    num_classes = getattr(pipeline.model, "num_classes", None)
    if num_classes != NUM_DIGITS:
        raise ValueError(
            f"the cfg-digits experiment needs a class-conditional digit model (model.num_classes = {NUM_DIGITS}); "
            f"this one has num_classes = {num_classes}. Train one with configs/digits_class_cfg.yaml"
        )
    _check_positive(per_class=per_class, batch_size=batch_size)
    if num_inference_steps is not None:
        _check_positive(num_inference_steps=num_inference_steps)
    if not guidance_scales:
        raise ValueError("guidance_scales is empty: give at least one scale, e.g. (1.0, 3.0)")
    _check_seed(seed)
    for scale in guidance_scales:
        _check_guidance_scale(scale, "guidance_scales")
    cells = [(method, float(scale)) for method in check_methods(methods) for scale in guidance_scales]
    classifier = classifier if classifier is not None else load_digit_classifier()
    reference = digit_features(classifier, _unit(load_dataset("digits", split="test").images))
    labels = torch.arange(NUM_DIGITS).repeat(per_class)  # [N]: 0, 1, …, 9, 0, 1, …
    options = {key: value for key, value in (("num_inference_steps", num_inference_steps), ("sampler", sampler))
               if value is not None}
    baseline = real_digits_baseline(classifier, len(labels), reference)
    rows, blocks = [], []
    for method, scale in cells:
        guidance = {} if method is None else {"guidance": method}
        with count_model_evaluations(pipeline) as evaluations:
            start = time.perf_counter()
            images = _generate_in_batches(
                pipeline, labels.split(batch_size), seed, lambda chunk: {"class_labels": chunk.tolist()},
                guidance_scale=scale, **guidance, **options,
            )
            seconds = time.perf_counter() - start
        predicted = classify(classifier, images)
        features = digit_features(classifier, images)
        rows.append({
            "method": guidance_name(method, pipeline),
            "guidance_scale": scale,
            "paper_w": scale - 1.0,
            "num_images": len(images),
            "mean_accuracy": mean_accuracy(predicted, labels),
            "per_class_accuracy": per_class_accuracy(predicted, labels, NUM_DIGITS),
            **sample_scores(features, reference, baseline),
            "seconds": seconds,
            "model_evaluations_per_image": None if evaluations.images is None else evaluations.images / len(images),
        })
        blocks.append(torch.stack([images[labels == digit][:grid_per_class] for digit in range(NUM_DIGITS)]))
        if log is not None:
            row = rows[-1]
            log(f"{row['method']} · scale {scale:g}: accuracy {row['mean_accuracy']:.1%}, "
                f"digit-FID {row['digit_fid']:.2f} (floor {baseline['digit_fid']:.2f}), KID {row['kid']:.4f}, {seconds:.0f}s")
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        steps = inference_steps(pipeline, num_inference_steps, sampler)
        settings = f"{per_class} digits per class, {sampler_name(sampler, pipeline)} with {steps} inference steps, seed {seed}"
        save_labeled_grid(torch.cat(blocks, dim=1), out_dir / "grid.png", row_labels=[str(d) for d in range(NUM_DIGITS)],
                          column_blocks=[f"{row['method']} · {row['guidance_scale']:g}" for row in rows],
                          title=f"rows: digits 0–9 · {settings}")
        _write_csv(out_dir / "results.csv", [_flat_cfg_row(row) for row in rows])
        baseline = real_digits_baseline(classifier, len(labels), reference)
        _write_text(out_dir / "results.md", format_cfg_markdown(rows, settings=settings, baseline=baseline))
        plot_frontier(rows, baseline, out_dir / "frontier.png", title=f"Guidance frontier: {settings}")
    return rows


def real_digits_baseline(classifier: DigitClassifier, num_images: int, reference_features: torch.Tensor) -> dict:
    """Accuracy, digit-FID and KID of ``num_images`` real training digits (classes balanced) against
    the test digits: the floor a perfect generator would reach at this sample size (FID is biased
    upwards at small n, so a generator's FID reads only beside the floor at its own n)."""
    train = load_dataset("digits", split="train")
    per_class = max(num_images // NUM_DIGITS, 1)
    index = torch.cat([torch.nonzero(train.labels == digit).flatten()[:per_class] for digit in range(NUM_DIGITS)])
    images, labels = _unit(train.images[index]), train.labels[index]
    features = digit_features(classifier, images)
    return {
        "num_images": len(index),
        "mean_accuracy": mean_accuracy(classify(classifier, images), labels),
        "digit_fid": frechet_distance(features, reference_features),
        "kid": kernel_inception_distance(features, reference_features),
    }


def sample_scores(features: torch.Tensor, reference_features: torch.Tensor, baseline: dict) -> dict:
    """``digit_fid`` and ``kid`` of generated images' classifier features, beside the real-digit
    floor at the same n (``floor_digit_fid``, ``floor_kid``; see ``real_digits_baseline``)."""
    return {"digit_fid": frechet_distance(features, reference_features),
            "kid": kernel_inception_distance(features, reference_features),
            "floor_digit_fid": baseline["digit_fid"], "floor_kid": baseline["kid"]}


def format_cfg_markdown(rows: list[dict], *, settings: str = "", baseline: dict | None = None) -> str:
    """The guidance sweep as Markdown: a caption, one table row per method × scale, the grid's legend."""
    digits = " | ".join(str(digit) for digit in range(NUM_DIGITS))
    lines = [
        "# Guidance on digits",
        "",
        "Guidance scale in diffusers' convention (1 = plain conditional, 0 = unconditional); the CFG "
        "paper's w = scale − 1. Accuracy: the digit classifier agrees with the requested class. "
        "Digit-FID: against the 500 held-out test digits (lower is closer). Evaluations: images through "
        "the eps-model per sample. " + SCORES_LEGEND + (f" {settings}." if settings else ""),
        "",
        f"| method | guidance scale | paper w | mean acc | digit-FID | floor FID | FID ÷ floor | KID | floor KID "
        f"| seconds | evaluations | {digits} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * NUM_DIGITS,
    ]
    for row in rows:
        per_class = " | ".join(f"{accuracy:.0%}" for accuracy in row["per_class_accuracy"])
        evaluations = row.get("model_evaluations_per_image")
        lines.append(
            f"| {row['method']} | {row['guidance_scale']:g} | {row['paper_w']:g} | {row['mean_accuracy']:.1%} | "
            f"{score_cells(row)} | {row['seconds']:.1f} | {'—' if evaluations is None else f'{evaluations:g}'} "
            f"| {per_class} |"
        )
    lines.append("")
    if baseline is not None:
        lines += [
            f"Real training digits ({baseline['num_images']}) score {baseline['mean_accuracy']:.1%} accuracy, "
            f"digit-FID {baseline['digit_fid']:.2f} and KID {baseline['kid']:.3g}: the floor at this "
            "sample size.",
            "",
        ]
    cells = ", ".join(f"{row['method']} · {row['guidance_scale']:g}" for row in rows)
    lines += [f"`grid.png`: rows are digits 0–9; column blocks, left to right: {cells}. `frontier.png`: "
              "accuracy against digit-FID, one line per method through its scales.", ""]
    return "\n".join(lines)


SCORES_LEGEND = (
    "Floor FID: real training digits, as many as the row's samples, against the same test digits — FID is "
    "biased upwards at small n, so read a digit-FID only beside the floor at its n (FID ÷ floor near 1 is as "
    "varied as real digits). KID: the unbiased squared MMD with the cubic polynomial kernel on the same "
    "classifier features (Bińkowski et al. 2018), in the features' own units; unbiased at any n, ~0 for real "
    "digits (negative values are sampling noise)."
)


def score_cells(row: dict) -> str:
    """The table cells ``digit-FID | floor FID | FID ÷ floor | KID | floor KID`` of one row."""
    return (f"{row['digit_fid']:.2f} | {row['floor_digit_fid']:.2f} | {row['digit_fid'] / row['floor_digit_fid']:.2f} | "
            f"{row['kid']:.3g} | {row['floor_kid']:.3g}")


def _flat_cfg_row(row: dict) -> dict:
    flat = {key: value for key, value in row.items() if key != "per_class_accuracy"}
    flat.update(mean_accuracy=round(row["mean_accuracy"], 4), digit_fid=round(row["digit_fid"], 4),
                floor_digit_fid=round(row["floor_digit_fid"], 4), kid=round(row["kid"], 6),
                floor_kid=round(row["floor_kid"], 6), seconds=round(row["seconds"], 2))
    flat.update({f"accuracy_{digit}": round(accuracy, 4) for digit, accuracy in enumerate(row["per_class_accuracy"])})
    return flat


# ---------------------------------------------------------------------------- prompts


def run_prompt_digits(
    pipeline,
    prompts_by_digit: dict[int, list[str]],
    *,
    per_prompt: int = 20,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 50,
    seed: int = 0,
    batch_size: int = 200,
    out_dir: str | Path | None = None,
    classifier: DigitClassifier | None = None,
    grid_per_prompt: int = 8,
) -> list[dict]:
    """Generate ``per_prompt`` images for every prompt and check that they show the prompt's digit.

    ``prompts_by_digit`` maps a digit to the prompts that ask for it (see
    :func:`default_digit_prompts`). Prompts share batches of at most ``batch_size``; batch ``i``
    uses a generator seeded from ``seed`` and ``i``. Returns one dict per prompt: ``digit``,
    ``prompt``, ``num_images``, ``match`` (fraction classified as ``digit``),
    ``predicted_counts`` (10 ints) and ``most_common`` (the digit predicted most often). With
    ``out_dir``, writes ``prompts.md`` and ``prompts_grid.png`` (one row per prompt, in order).
    """
    pairs = [(digit, prompt) for digit, prompts in _check_prompts(prompts_by_digit).items() for prompt in prompts]
    _check_positive(per_prompt=per_prompt, batch_size=batch_size, num_inference_steps=num_inference_steps)
    _check_seed(seed)
    _check_guidance_scale(guidance_scale, "guidance_scale")
    classifier = classifier if classifier is not None else load_digit_classifier()
    pair_index = torch.arange(len(pairs)).repeat_interleave(per_prompt)  # [N]: which pair each image is for
    start = time.perf_counter()
    images = _generate_in_batches(
        pipeline, pair_index.split(batch_size), seed, lambda chunk: {"prompts": [pairs[i][1] for i in chunk.tolist()]},
        guidance_scale=float(guidance_scale), num_inference_steps=num_inference_steps,
    )
    seconds = time.perf_counter() - start
    predicted = classify(classifier, images).reshape(len(pairs), per_prompt)  # [P, per_prompt]
    rows = []
    for (digit, prompt), guesses in zip(pairs, predicted):
        counts = torch.bincount(guesses, minlength=NUM_DIGITS).tolist()
        rows.append({
            "digit": digit, "prompt": prompt, "num_images": per_prompt,
            "match": counts[digit] / per_prompt, "predicted_counts": counts,
            "most_common": Counter(guesses.tolist()).most_common(1)[0][0],
        })
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_labeled_grid(images.reshape(len(pairs), per_prompt, *images.shape[1:])[:, :grid_per_prompt],
                          out_dir / "prompts_grid.png", row_labels=[prompt for _, prompt in pairs],
                          title=f"one row per prompt · guidance scale {guidance_scale:g} · seed {seed}")
        settings = (f"{per_prompt} images per prompt, guidance scale {guidance_scale:g} (paper w = "
                    f"{guidance_scale - 1:g}), {num_inference_steps} inference steps, seed {seed}, {seconds:.0f}s")
        _write_text(out_dir / "prompts.md", format_prompt_markdown(rows, settings=settings))
    return rows


def format_prompt_markdown(rows: list[dict], *, settings: str = "") -> str:
    """The prompt experiment as Markdown: one table row per prompt, in the grid's row order."""
    mean = sum(row["match"] for row in rows) / max(len(rows), 1)
    lines = [
        "# Prompted digits",
        "",
        "Match: the fraction of a prompt's images that the digit classifier reads as the requested digit."
        + (f" {settings}." if settings else ""),
        "",
        "| row | digit | prompt | match | most common prediction |",
        "| ---: | ---: | --- | ---: | ---: |",
    ]
    for number, row in enumerate(rows):
        prompt = row["prompt"].replace("|", "\\|")
        lines.append(f"| {number} | {row['digit']} | {prompt} | {row['match']:.0%} | {row['most_common']} |")
    lines += ["", f"Mean match over {len(rows)} prompts: {mean:.1%}. `prompts_grid.png` has one row per prompt.", ""]
    return "\n".join(lines)


def load_prompts_file(path: str | Path) -> dict[int, list[str]]:
    """Read a YAML mapping of digit → list of prompts (``7: ["a handwritten digit seven", "7"]``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    return _check_prompts(data, source=str(path))


def _check_prompts(prompts_by_digit, source: str = "prompts_by_digit") -> dict[int, list[str]]:
    if not isinstance(prompts_by_digit, dict) or not prompts_by_digit:
        raise ValueError(f"{source} must map digits (0–9) to lists of prompts, e.g. {{7: ['seven', '7']}}")
    checked = {}
    for digit, prompts in prompts_by_digit.items():
        if type(digit) is not int or not 0 <= digit < NUM_DIGITS:
            raise ValueError(f"{source}: key {digit!r} is not a digit 0–9")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{source}: digit {digit} must have a non-empty list of prompt strings, got {prompts!r}")
        checked[digit] = prompts
    return checked


# ---------------------------------------------------------------------------- shared helpers


def _generate_in_batches(pipeline, chunks, seed: int, conditioning, **generate_kwargs) -> torch.Tensor:
    """``pipeline.generate`` per chunk with its own seeded generator; the images concatenated on the CPU."""
    images = []
    for index, chunk in enumerate(chunks):
        generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + index)
        images.append(pipeline.generate(**conditioning(chunk), generator=generator, **generate_kwargs).cpu())
    return torch.cat(images)  # [N, 1, 28, 28] in [0, 1]


def _write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _unit(images: torch.Tensor) -> torch.Tensor:
    """Dataset images in [-1, 1] → [0, 1], what the classifier and ``generate`` use."""
    return (images + 1) / 2


def _check_seed(seed: int) -> None:
    check_seed(seed)
    if seed >= _SEED_LIMIT:
        raise ValueError(f"seed must be below {_SEED_LIMIT} (batch i draws from seed × {_SEED_STRIDE} + i), got {seed}")


def _check_guidance_scale(scale: float, name: str) -> None:
    """An experiment measures guidance from 0 (unconditional) up; a negative scale (extrapolating
    away from the condition) would only add columns of failures to its tables."""
    if isinstance(scale, bool) or not isinstance(scale, Real) or not 0 <= scale < float("inf"):
        raise ValueError(
            f"{name} must be finite and 0 or more (0 = unconditional, 1 = plain conditional, 3 = the paper's w = 2), "
            f"got {scale!r}: a negative scale steers away from the condition, which these experiments do not "
            "score; Pipeline.generate(guidance_scale=...) draws it"
        )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
