"""The guidance frontier experiment's parts: guidance methods named and checked, model evaluations
counted, and the plot of class accuracy against digit-FID, one line per method through its scales,
next to the floor of real digits and the region a good setting should reach."""

from __future__ import annotations

import time
from pathlib import Path
from typing import BinaryIO

import torch

from minild.config import parse_stage

# A setting is on target when it is nearly always the requested digit and nearly as varied as real digits.
TARGET_ACCURACY = 0.985
TARGET_FID_FACTOR = 1.3  # digit-FID at most this many times the real-digit floor
ZOOM_ACCURACY = 0.9  # the right panel shows only settings at least this accurate


def plot_frontier(rows: list[dict], baseline: dict, path: str | Path | BinaryIO, *, title: str = "") -> None:
    """Write ``frontier.png``: x = digit-FID, y = mean accuracy; one line with markers
    per ``row["method"]`` through its ``guidance_scale`` values (each point annotated with its
    scale); the real-digit floor (``baseline``'s digit-FID and accuracy) as a star and dashed lines;
    the target region (accuracy ≥ 98.5 %, digit-FID ≤ 1.3 × floor) shaded. The left panel shows
    every setting (FID on a log scale), the right one zooms in on those at least 90 % accurate.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, PercentFormatter

    methods = list(dict.fromkeys(row["method"] for row in rows))  # in order of appearance
    floor_fid, floor_accuracy = baseline["digit_fid"], baseline["mean_accuracy"]
    target_fid = TARGET_FID_FACTOR * floor_fid
    figure = Figure(figsize=(13, 5.2), dpi=100)
    FigureCanvasAgg(figure)
    full, zoom = figure.subplots(1, 2)
    fids = [row["digit_fid"] for row in rows] + [floor_fid]
    left = 0.8 * min(fids)
    close = [row["digit_fid"] for row in rows if row["mean_accuracy"] >= ZOOM_ACCURACY]
    zoom_right = max([1.2 * max(close, default=0), 1.6 * target_fid])
    panels = ((full, "log", 1.25 * max(fids), 0.0), (zoom, "linear", zoom_right, ZOOM_ACCURACY))
    for axes, x_scale, x_right, y_bottom in panels:
        axes.fill_between([left, target_fid], TARGET_ACCURACY, 1.005, color="tab:green", alpha=0.12, lw=0,
                          label=f"target: accuracy ≥ {TARGET_ACCURACY:.1%}, FID ≤ {TARGET_FID_FACTOR:g}× floor")
        axes.axvline(floor_fid, color="gray", ls="--", lw=1)
        axes.axhline(floor_accuracy, color="gray", ls=":", lw=1)
        axes.plot([floor_fid], [floor_accuracy], "*", color="black", ms=13,
                  label=f"real digits, same n ({baseline.get('num_images', '?')}): FID {floor_fid:.1f}, {floor_accuracy:.1%}")
        for method in methods:
            points = sorted((row["guidance_scale"], row["digit_fid"], row["mean_accuracy"])
                            for row in rows if row["method"] == method)
            line, = axes.plot([fid for _, fid, _ in points], [accuracy for _, _, accuracy in points], "o-",
                              label=method, ms=5)
            for scale, fid, accuracy in points:
                if left <= fid <= x_right and accuracy >= y_bottom:
                    axes.annotate(f"{scale:g}", (fid, accuracy), textcoords="offset points", xytext=(4, 4),
                                  fontsize=8, color=line.get_color())
        axes.set(xscale=x_scale, xlim=(left, x_right), ylim=(y_bottom, 1.005), ylabel="mean class accuracy",
                 xlabel=f"digit-FID against held-out digits ({x_scale} scale; lower = closer to real digits)")
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        if x_scale == "log":
            axes.xaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
            for formatter in (axes.xaxis.set_major_formatter, axes.xaxis.set_minor_formatter):
                formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.grid(True, which="both", alpha=0.25)
    full.set_title("every method × guidance scale (numbers: scales)")
    zoom.set_title(f"settings at least {ZOOM_ACCURACY:.0%} accurate")
    zoom.legend(loc="lower right", fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    if isinstance(path, (str, Path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")


def guidance_name(spec: str | dict | None, pipeline=None) -> str:
    """A guidance spec as the command line writes it, without its ``scale`` (the sweep sets it):
    ``"apg"``, ``"cfg_interval:sigma_low=0.3"``; None is the pipeline's configured guidance
    (``"cfg"`` when its config names none)."""
    if spec is None:
        configured = getattr(getattr(pipeline, "config", None), "guidance", None)
        spec = configured.to_dict() if configured is not None else "cfg"
    if isinstance(spec, str):
        return spec
    params = ",".join(f"{key}={value}" for key, value in spec.items() if key not in ("name", "scale"))
    return spec["name"] + (f":{params}" if params else "")


def count_model_evaluations(pipeline):
    """A context manager counting the images that go through the pipeline's eps-model (and its
    EMA copy): ``counter.images`` after the block, None when the model is not a torch module."""
    return _EvaluationCounter([getattr(pipeline, name, None) for name in ("model", "ema_model")])


class _EvaluationCounter:
    def __init__(self, models):
        self.models = [model for model in models if isinstance(model, torch.nn.Module)]
        self.images = 0 if self.models else None

    def _count(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]  # [B, C, H, W]
        self.images += x.shape[0]

    def __enter__(self):
        self.handles = [model.register_forward_pre_hook(self._count, with_kwargs=True) for model in self.models]
        return self

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()


def check_methods(methods) -> list:
    """``[None]`` (the configured guidance) or the specs, each a name or a dict with a ``name``."""
    if methods is None:
        return [None]
    if isinstance(methods, (str, dict)) or not methods:
        raise ValueError(f"methods must be a non-empty list of guidance specs (names or dicts), got {methods!r}; "
                         "e.g. ['cfg', {'name': 'cfg_interval', 'sigma_low': 0.3}]")
    for method in methods:
        name = method.get("name") if isinstance(method, dict) else method
        if not isinstance(name, str) or not name:
            raise ValueError(f"methods: {method!r} is not a guidance spec; give a name ('apg') or a dict with "
                             "'name' and the method's parameters")
        parse_stage("guidance", method, "methods", name)  # fails here, not after some cells
    return list(methods)


def sampler_name(sampler, pipeline) -> str:
    if sampler is not None:
        return sampler if isinstance(sampler, str) else sampler.get("name", "the configured sampler")
    configured = getattr(getattr(pipeline, "config", None), "sampler", None)
    return getattr(configured, "name", None) or "the configured sampler"


# ---------------------------------------------------------------------------- text models

# Phrasings for scoring a text model that are not among configs/digits_text*.yaml's training
# templates: whether guidance still finds the digit when the prompt is worded in a new way.
HELD_OUT_TEMPLATES = ("a picture of the digit {name}", "the digit {label}", "write {name}")


def prompt_phrasings(pipeline, phrasings=None) -> list[tuple[str, bool]]:
    """``(template, held_out)`` pairs: ``phrasings`` (templates with ``{name}`` / ``{label}``), by
    default as many of the model's training templates as there are ``HELD_OUT_TEMPLATES`` it was
    not trained on, then those; ``held_out`` is True for a template the model never saw."""
    from minild.conditioning import DEFAULT_PROMPT_TEMPLATES

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
    scored like ``minild.experiments.run_cfg_digits`` (accuracy, digit-FID and KID beside the
    real-digit floor at the same n). Every phrasing of a cell starts from the same noise.

    Returns one row per method × scale × phrasing (``phrasing``, ``held_out``), then per method ×
    scale one pooled row for the held-out and one for the training phrasings (``phrasing`` "held-out
    (pooled)" / "training (pooled)"). With ``out_dir``: ``results.csv``, ``results.md`` and
    ``frontier.png`` (one line per method and phrasing group, pooled)."""
    from minild import experiments
    from minild.conditioning import wants_text
    from minild.data import load_dataset
    from minild.metrics import classify, digit_features, load_digit_classifier, mean_accuracy, per_class_accuracy

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
    from minild.experiments import DIGIT_WORDS

    return template.format(name=DIGIT_WORDS[digit], label=digit)


def _steps(pipeline, num_inference_steps, sampler) -> int:
    from minild.images import inference_steps

    return inference_steps(pipeline, num_inference_steps, sampler)


def _write_prompt_frontier(rows, pooled, floors, out_dir, *, per_class, seed, steps, sampler) -> None:
    from minild import experiments

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
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    lines_for_plot = [{**row, "method": f"{row['method']} · {row['phrasing'].split(' ')[0]} phrasings"} for row in pooled]
    held_out_n = next((row["num_images"] for row in pooled if row["held_out"]), pooled[0]["num_images"])
    plot_frontier(lines_for_plot, floors[held_out_n], out_dir / "frontier.png",
                  title=f"Prompt guidance frontier (phrasings pooled): {settings}")
