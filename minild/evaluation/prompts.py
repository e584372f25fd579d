"""The guidance frontier of a text-conditioned digit model: prompts from phrasings the model was
trained on and from phrasings it never saw, scored like ``minild.evaluation.experiments``."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from minild.conditioning import DEFAULT_PROMPT_TEMPLATES, wants_text
from minild.data import DIGIT_WORDS, load_dataset
from minild.evaluation import experiments
from minild.evaluation.frontier import check_methods, guidance_name, plot_frontier, sampler_name
from minild.evaluation.metrics import classify, digit_features, load_digit_classifier, mean_accuracy, per_class_accuracy
from minild.pipeline.grids import inference_steps

# Phrasings for scoring a text model that are not among configs/digits_text*.yaml's training
# templates: whether guidance still finds the digit when the prompt is worded in a new way.
HELD_OUT_TEMPLATES = ("a picture of the digit {name}", "the digit {label}", "write {name}")


def prompt_phrasings(pipeline, phrasings=None) -> list[tuple[str, bool]]:
    """``(template, held_out)`` pairs: ``phrasings`` (templates with ``{name}`` / ``{label}``), by
    default as many of the model's training templates as there are ``HELD_OUT_TEMPLATES`` it was
    not trained on, then those; ``held_out`` is True for a template the model never saw."""
    trained = list(pipeline.config.data.prompt_templates or DEFAULT_PROMPT_TEMPLATES)
    if phrasings is None:
        held_out = [template for template in HELD_OUT_TEMPLATES if template not in trained]
        phrasings = trained[:len(held_out)] + held_out
    if isinstance(phrasings, str) or not phrasings:
        raise ValueError(f"phrasings must be a non-empty list of templates such as '{{name}}', got {phrasings!r}")
    for template in phrasings:
        if not isinstance(template, str) or ("{name}" not in template and "{label}" not in template):
            raise ValueError(f"phrasing {template!r} names no digit: use {{name}} ('seven') or {{label}} ('7')")
    return [(template, template not in trained) for template in phrasings]


def run_prompt_frontier(pipeline, *, methods=None, guidance_scales=(1.0, 2.0, 3.0, 5.0), phrasings=None,
                        per_class: int = 20, num_inference_steps: int | None = None, sampler=None, seed: int = 0,
                        batch_size: int = 200, out_dir=None, classifier=None, log=None) -> list[dict]:
    """The guidance frontier of a text-conditioned digit model: for each guidance method × scale ×
    phrasing, ``per_class`` images of every digit from prompts such as "a picture of the digit seven",
    scored like ``minild.evaluation.experiments.run_cfg_digits`` (accuracy, digit-FID and KID beside the
    real-digit floor at the same n). Every phrasing of a cell starts from the same noise.

    Returns one row per method × scale × phrasing (``phrasing``, ``held_out``), then per method ×
    scale one pooled row for the held-out and one for the training phrasings (``phrasing`` "held-out
    (pooled)" / "training (pooled)"). With ``out_dir``: ``results.csv``, ``results.md`` and
    ``frontier.png`` (one line per method and phrasing group, pooled)."""
    if not wants_text(getattr(pipeline, "model", None)):
        raise ValueError("the prompt frontier needs a text-conditioned model (model.cross_attention_dim and a "
                         "text_encoder stage); train configs/digits_text_latent.yaml")
    experiments._check_positive(per_class=per_class, batch_size=batch_size)
    pairs = prompt_phrasings(pipeline, phrasings)
    cells = [(method, float(scale)) for method in check_methods(methods) for scale in guidance_scales]
    classifier = classifier if classifier is not None else load_digit_classifier()
    reference = digit_features(classifier, experiments._unit(load_dataset("digits", split="test").images))
    labels = torch.arange(experiments.NUM_DIGITS).repeat(per_class)  # [N]
    floors = {}  # n → real_digits_baseline at n

    def score(images, image_labels, **row):
        n = len(images)
        floors.setdefault(n, experiments.real_digits_baseline(classifier, n, reference))
        predicted = classify(classifier, images)
        return {**row, "num_images": n, "mean_accuracy": mean_accuracy(predicted, image_labels),
                "per_class_accuracy": per_class_accuracy(predicted, image_labels, experiments.NUM_DIGITS),
                **experiments.sample_scores(digit_features(classifier, images), reference, floors[n])}

    options = {key: value for key, value in (("num_inference_steps", num_inference_steps), ("sampler", sampler))
               if value is not None}
    rows, pooled = [], []
    for method, scale in cells:
        name, groups = guidance_name(method, pipeline), {True: [], False: []}
        for template, held_out in pairs:
            start = time.perf_counter()
            images = experiments._generate_in_batches(
                pipeline, labels.split(batch_size), seed,
                lambda chunk: {"prompts": [_phrase(template, digit) for digit in chunk.tolist()]},
                guidance_scale=scale, **({} if method is None else {"guidance": method}), **options,
            )
            rows.append(score(images, labels, method=name, guidance_scale=scale, paper_w=scale - 1.0,
                              phrasing=template, held_out=held_out, seconds=time.perf_counter() - start))
            groups[held_out].append(images)
            if log is not None:
                log(f"{name} · {scale:g} · {template!r}{' (held out)' if held_out else ''}: accuracy "
                    f"{rows[-1]['mean_accuracy']:.1%}, digit-FID {rows[-1]['digit_fid']:.2f} "
                    f"(floor {rows[-1]['floor_digit_fid']:.2f}), KID {rows[-1]['kid']:.4f}")
        for held_out, images in groups.items():
            if images:
                pooled.append(score(torch.cat(images), labels.repeat(len(images)), method=name, guidance_scale=scale,
                                    paper_w=scale - 1.0, phrasing="held-out (pooled)" if held_out else "training (pooled)",
                                    held_out=held_out, seconds=sum(row["seconds"] for row in rows[-len(pairs):]
                                                                   if row["held_out"] == held_out)))
    if out_dir is not None:
        _write_prompt_frontier(rows, pooled, floors, out_dir, per_class=per_class, seed=seed,
                               steps=_steps(pipeline, num_inference_steps, sampler), sampler=sampler_name(sampler, pipeline))
    return rows + pooled


def _phrase(template: str, digit: int) -> str:
    return template.format(name=DIGIT_WORDS[digit], label=digit)


def _steps(pipeline, num_inference_steps, sampler) -> int:
    return inference_steps(pipeline, num_inference_steps, sampler)


def _write_prompt_frontier(rows, pooled, floors, out_dir, *, per_class, seed, steps, sampler) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = [{key: value for key, value in row.items() if key != "per_class_accuracy"} for row in rows + pooled]
    experiments._write_csv(out_dir / "results.csv", flat)
    settings = f"{per_class} digits per class and phrasing, {sampler} with {steps} inference steps, seed {seed}"
    lines = ["# Guidance on prompted digits", "",
             "One row per guidance method × scale × phrasing ({name} → 'seven', {label} → '7'); held out: a "
             "phrasing that is not among the model's training templates. Scale in diffusers' convention "
             f"(1 = plain conditional). {experiments.SCORES_LEGEND} {settings}.", "",
             "| method | guidance scale | phrasing | held out | n | mean acc | digit-FID | floor FID | FID ÷ floor "
             "| KID | floor KID | seconds |",
             "| --- | ---: | --- | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows + pooled:
        phrasing = row["phrasing"].replace("|", "\\|")
        lines.append(f"| {row['method']} | {row['guidance_scale']:g} | {phrasing} | {'yes' if row['held_out'] else 'no'} "
                     f"| {row['num_images']} | {row['mean_accuracy']:.1%} | {experiments.score_cells(row)} "
                     f"| {row['seconds']:.1f} |")
    experiments._write_text(out_dir / "results.md", "\n".join(lines) + "\n")
    lines_for_plot = [{**row, "method": f"{row['method']} · {row['phrasing'].split(' ')[0]} phrasings"} for row in pooled]
    held_out_n = next((row["num_images"] for row in pooled if row["held_out"]), pooled[0]["num_images"])
    plot_frontier(lines_for_plot, floors[held_out_n], out_dir / "frontier.png",
                  title=f"Prompt guidance frontier (phrasings pooled): {settings}")
