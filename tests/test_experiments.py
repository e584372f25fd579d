"""Experiments: the guidance sweep and the prompt check, with a stub pipeline that draws real
digits, and the `minild experiment` command end to end on a tiny saved pipeline."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import minild
from minild.evaluation import metrics
from minild.cli import _parser, main
from minild.data import load_dataset
from minild.evaluation.experiments import (
    DIGIT_WORDS,
    default_digit_prompts,
    format_cfg_markdown,
    load_prompts_file,
    real_digits_baseline,
    run_cfg_digits,
    run_prompt_digits,
)
from tests.conftest import tiny_config
from tests.test_metrics import QUICK_TRAIN_STEPS, quick_classifier_cache
CELL = 28 + 2  # an image and its padding, before the grid enlarges it


class RealDigitsPipeline:
    """Stands in for a perfect generator: ``generate`` returns held-out test digits of the
    requested classes (or of the digit a prompt names), chosen with the given generator."""

    def __init__(self, num_classes: int | None = 10):
        test = load_dataset("digits", split="test")
        self.images, self.labels = (test.images + 1) / 2, test.labels
        self.model = SimpleNamespace(num_classes=num_classes)
        self.calls = []

    def generate(self, num_images=None, *, class_labels=None, prompts=None, guidance_scale=1.0, guidance=None,
                 num_inference_steps=50, sampler=None, generator=None, seed=None):
        if prompts is not None:
            class_labels = [_digit_named_in(prompt) for prompt in prompts]
        self.calls.append({"num_images": len(class_labels), "guidance_scale": guidance_scale, "guidance": guidance,
                           "sampler": sampler, "steps": num_inference_steps, "seed": generator.initial_seed()})
        picks = []
        for label in class_labels:
            candidates = torch.nonzero(self.labels == label).flatten()
            picks.append(candidates[torch.randint(len(candidates), (), generator=generator)])
        return self.images[torch.stack(picks)]  # [B, 1, 28, 28] in [0, 1]


def _digit_named_in(prompt: str) -> int:
    for word in prompt.split():
        if word.isdigit():
            return int(word)
        if word in DIGIT_WORDS:
            return DIGIT_WORDS.index(word)
    raise ValueError(f"no digit in {prompt!r}")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return quick_classifier_cache(tmp_path_factory)


@pytest.fixture
def classifier(cache_dir):
    return metrics.load_digit_classifier(cache_dir, train_steps=QUICK_TRAIN_STEPS)


# ---------------------------------------------------------------------------- cfg-digits


def test_cfg_digits_writes_grid_csv_and_markdown_with_one_row_per_scale(tmp_path, classifier):
    rows = run_cfg_digits(RealDigitsPipeline(), guidance_scales=(0.0, 1.0, 3.0), per_class=10, batch_size=32,
                          out_dir=tmp_path, classifier=classifier, grid_per_class=4)
    assert [row["guidance_scale"] for row in rows] == [0.0, 1.0, 3.0]
    assert [row["paper_w"] for row in rows] == [-1.0, 0.0, 2.0]
    for row in rows:
        assert row["num_images"] == 100
        assert row["mean_accuracy"] > 0.85  # real digits: as good as the classifier
        assert len(row["per_class_accuracy"]) == 10
        assert 0 < row["digit_fid"] < 50
    with (tmp_path / "results.csv").open() as file:
        table = list(csv.DictReader(file))
    assert len(table) == 3
    assert float(table[2]["guidance_scale"]) == 3.0 and "accuracy_9" in table[2]
    markdown = (tmp_path / "results.md").read_text()
    assert ("| method | guidance scale | paper w | mean acc | digit-FID | floor FID | FID ÷ floor | KID | "
            "floor KID | seconds | evaluations |") in markdown
    assert len([line for line in markdown.splitlines() if line.startswith("| cfg | ")]) == 3
    # 10 labelled rows of digits, enlarged; 3 blocks of 4 columns under their headers.
    width, height = Image.open(tmp_path / "grid.png").size
    assert width > 2 * 3 * 4 * CELL and height > 2 * 10 * CELL


def test_cfg_digits_puts_the_real_digit_floor_at_the_same_n_and_kid_beside_each_fid(classifier):
    rows = run_cfg_digits(RealDigitsPipeline(), guidance_scales=(1.0,), per_class=3, batch_size=32,
                          classifier=classifier)
    reference = metrics.digit_features(classifier, (load_dataset("digits", split="test").images + 1) / 2)
    floor = real_digits_baseline(classifier, 30, reference)
    assert floor["num_images"] == 30
    assert rows[0]["floor_digit_fid"] == floor["digit_fid"] and rows[0]["floor_kid"] == floor["kid"]
    # FID's small-n bias: the floor at 30 images sits far above the floor at 1,000.
    assert floor["digit_fid"] > 1.5 * real_digits_baseline(classifier, 1000, reference)["digit_fid"]
    row = format_cfg_markdown(rows).splitlines()[6]
    assert f"| {rows[0]['digit_fid']:.2f} | {floor['digit_fid']:.2f} | " in row and f"| {floor['kid']:.3g} |" in row


def test_cfg_digits_samples_in_bounded_seeded_batches(classifier):
    pipeline = RealDigitsPipeline()
    first = run_cfg_digits(pipeline, guidance_scales=(1.0, 5.0), per_class=10, batch_size=32, classifier=classifier)
    assert [call["num_images"] for call in pipeline.calls] == [32, 32, 32, 4] * 2
    assert [call["guidance_scale"] for call in pipeline.calls] == [1.0] * 4 + [5.0] * 4
    assert [call["seed"] for call in pipeline.calls[:4]] == [call["seed"] for call in pipeline.calls[4:]]
    assert len({call["seed"] for call in pipeline.calls[:4]}) == 4
    again = run_cfg_digits(RealDigitsPipeline(), guidance_scales=(1.0, 5.0), per_class=10, batch_size=32,
                           classifier=classifier)
    assert [row["digit_fid"] for row in again] == [row["digit_fid"] for row in first]


def test_cfg_digits_scores_every_method_at_every_scale_from_the_same_noise(tmp_path, classifier):
    pipeline = RealDigitsPipeline()
    interval = {"name": "cfg_interval", "sigma_low": 0.3}
    rows = run_cfg_digits(pipeline, methods=["cfg", interval], guidance_scales=(1.5, 3.0), per_class=3, batch_size=16,
                          num_inference_steps=7, sampler="ddpm", out_dir=tmp_path, classifier=classifier,
                          grid_per_class=2)
    assert [(row["method"], row["guidance_scale"]) for row in rows] == [
        ("cfg", 1.5), ("cfg", 3.0), ("cfg_interval:sigma_low=0.3", 1.5), ("cfg_interval:sigma_low=0.3", 3.0)]
    assert [call["guidance"] for call in pipeline.calls] == ["cfg"] * 4 + [interval] * 4  # 2 batches per cell
    assert {(call["sampler"], call["steps"]) for call in pipeline.calls} == {("ddpm", 7)}
    seeds = [tuple(call["seed"] for call in pipeline.calls[start:start + 2]) for start in range(0, 8, 2)]
    assert len(set(seeds)) == 1 and len(set(seeds[0])) == 2  # the same two batches of noise in every cell
    assert all(row["model_evaluations_per_image"] is None for row in rows)  # the stub has no torch model
    assert {path.name for path in tmp_path.iterdir()} == {"grid.png", "results.csv", "results.md", "frontier.png"}
    with (tmp_path / "results.csv").open() as file:
        table = list(csv.DictReader(file))
    assert [(line["method"], line["guidance_scale"]) for line in table][2] == ("cfg_interval:sigma_low=0.3", "1.5")
    markdown = (tmp_path / "results.md").read_text()
    assert "| cfg_interval:sigma_low=0.3 | 3 | 2 |" in markdown and "ddpm with 7 inference steps" in markdown
    assert Image.open(tmp_path / "frontier.png").size[0] > 800


def test_cfg_digits_refuses_methods_that_are_not_guidance_specs(classifier):
    for methods in ("cfg", [], [{"sigma_low": 0.3}]):
        with pytest.raises(ValueError, match="guidance spec"):
            run_cfg_digits(RealDigitsPipeline(), methods=methods, classifier=classifier)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"guidance_scales": (1.0, -1.0)}, r"guidance_scales must be finite and 0 or more .* got -1.0: a negative scale"),
    ({"guidance_scales": (float("nan"),)}, "guidance_scales must be finite and 0 or more"),
    ({"seed": -1}, r"seed must lie in \[0, 2\*\*64\), got -1: torch would wrap"),
    ({"seed": 2**60}, r"seed must be below 1844674407370955 \(batch i draws from seed × 10000 \+ i\)"),
])
def test_cfg_digits_refuses_negative_scales_and_seeds_before_sampling(kwargs, message):
    pipeline = RealDigitsPipeline()
    with pytest.raises(ValueError, match=message):
        run_cfg_digits(pipeline, per_class=1, **kwargs)
    assert pipeline.calls == []


def test_prompt_digits_refuses_a_negative_scale_and_seed():
    for kwargs in ({"guidance_scale": -2.0}, {"seed": -3}):
        with pytest.raises(ValueError, match="must be finite and 0 or more|seed must lie in"):
            run_prompt_digits(RealDigitsPipeline(), default_digit_prompts(), per_prompt=1, **kwargs)


def test_cfg_digits_refuses_a_model_that_is_not_class_conditional(classifier):
    with pytest.raises(ValueError, match="class-conditional"):
        run_cfg_digits(RealDigitsPipeline(num_classes=None), classifier=classifier)


# ---------------------------------------------------------------------------- prompt-digits


def test_prompt_digits_reports_the_match_of_every_prompt(tmp_path, classifier):
    prompts = default_digit_prompts()
    assert prompts[7] == ["a handwritten digit seven", "7", "seven"]
    pipeline = RealDigitsPipeline()
    rows = run_prompt_digits(pipeline, prompts, per_prompt=6, batch_size=50, out_dir=tmp_path,
                             classifier=classifier, grid_per_prompt=5)
    assert len(rows) == 30
    assert [call["num_images"] for call in pipeline.calls] == [50, 50, 50, 30]
    assert rows[21] == {**rows[21], "digit": 7, "prompt": "a handwritten digit seven", "num_images": 6}
    assert sum(row["match"] for row in rows) / len(rows) > 0.85
    assert all(sum(row["predicted_counts"]) == 6 for row in rows)
    markdown = (tmp_path / "prompts.md").read_text()
    assert "| 21 | 7 | a handwritten digit seven |" in markdown
    width, height = Image.open(tmp_path / "prompts_grid.png").size
    assert width > 2 * 5 * CELL and height > 2 * 30 * CELL  # and a label left of every row


def test_prompts_file_maps_digits_to_prompts(tmp_path):
    good = tmp_path / "prompts.yaml"
    good.write_text("3: [three, 'a handwritten 3']\n8: eight\n")
    assert load_prompts_file(good) == {3: ["three", "a handwritten 3"], 8: ["eight"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("eleven: [eleven]\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: key 'eleven' is not a digit"):
        load_prompts_file(bad)


# ---------------------------------------------------------------------------- command line


@pytest.fixture
def cached_classifier_env(cache_dir, monkeypatch):
    """What the CLI loads by default (``$MINILD_CACHE``, ``TRAIN_STEPS``) points at the quick classifier."""
    monkeypatch.setenv("MINILD_CACHE", str(cache_dir))
    monkeypatch.setattr(metrics, "TRAIN_STEPS", QUICK_TRAIN_STEPS)


@pytest.mark.filterwarnings("ignore:classifier-free guidance with a model trained without condition dropout")
def test_cli_cfg_digits_runs_a_saved_pipeline_end_to_end(tmp_path, cached_classifier_env, capsys):
    run = tmp_path / "run"
    minild.Pipeline.from_config(tiny_config(model={"num_classes": 10})).save_pretrained(run)
    assert main(["experiment", "cfg-digits", str(run), "--per-class", "2", "--scales", "1", "3", "--steps", "2",
                 "--sampler", "ddpm"]) == 0
    out = capsys.readouterr().out
    assert "| method | guidance scale | paper w |" in out and "ddpm with 2 inference steps" in out
    # two steps: one forward per image and step at scale 1, a conditional and an unconditional one at scale 3
    assert "| cfg | 1 | 0 |" in out and "| 2 | " in out.split("| cfg | 1 | 0 |")[1].split("\n")[0]
    assert "| cfg | 3 | 2 |" in out and "| 4 | " in out.split("| cfg | 3 | 2 |")[1].split("\n")[0]
    results = run / "cfg_digits"
    assert {path.name for path in results.iterdir()} == {"grid.png", "results.csv", "results.md", "frontier.png"}
    width, height = Image.open(results / "grid.png").size
    assert width > 2 * 2 * 2 * CELL and height > 2 * 10 * CELL


@pytest.mark.filterwarnings("ignore:classifier-free guidance with a model trained without condition dropout")
def test_cli_cfg_digits_compares_guidance_methods(tmp_path, cached_classifier_env, capsys):
    run = tmp_path / "run"
    minild.Pipeline.from_config(tiny_config(model={"num_classes": 10})).save_pretrained(run)
    assert main(["experiment", "cfg-digits", str(run), "--per-class", "1", "--scales", "3", "--steps", "4",
                 "--methods", "cfg,cfg_interval:sigma_low=0.5,sigma_high=2", "apg", "--out", str(tmp_path / "out")]) == 0
    with (tmp_path / "out" / "results.csv").open() as file:
        table = {line["method"]: float(line["model_evaluations_per_image"]) for line in csv.DictReader(file)}
    assert list(table) == ["cfg", "cfg_interval:sigma_low=0.5,sigma_high=2", "apg"]
    assert table["cfg"] == table["apg"] == 8  # 4 steps, two passes each
    assert 4 <= table["cfg_interval:sigma_low=0.5,sigma_high=2"] < 8  # one pass outside the interval
    assert (tmp_path / "out" / "frontier.png").is_file()
    assert main(["experiment", "cfg-digits", str(run), "--methods", "cgf"]) == 2
    assert "unknown guidance 'cgf' (did you mean 'cfg'?)" in capsys.readouterr().err


def test_cli_methods_are_names_with_optional_parameters():
    args = _parser().parse_args(["experiment", "cfg-digits", "RUN", "--methods", "cfg,cfg_interval:sigma_low=0.3,"
                                 "sigma_high=2", "apg", "--scales", "1", "1.5"])
    assert args.methods == [[{"name": "cfg"}, {"name": "cfg_interval", "sigma_low": 0.3, "sigma_high": 2}],
                            [{"name": "apg"}]]
    assert args.scales == [1.0, 1.5] and args.steps is None and args.sampler is None


def test_cli_cfg_digits_on_an_unconditional_run_is_an_error(tmp_path, cached_classifier_env, capsys):
    run = tmp_path / "run"
    minild.Pipeline.from_config(tiny_config()).save_pretrained(run)
    assert main(["experiment", "cfg-digits", str(run)]) == 2
    assert "not a class-conditional digit run" in capsys.readouterr().err


def test_cli_cfg_digits_refuses_a_negative_scale_in_one_line(tmp_path, cached_classifier_env, capsys):
    run = tmp_path / "run"
    minild.Pipeline.from_config(tiny_config(model={"num_classes": 10})).save_pretrained(run)
    assert main(["experiment", "cfg-digits", str(run), "--scales", "1", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minild: error: guidance_scales must be finite and 0 or more") and err.count("\n") == 1
    assert not (run / "cfg_digits").exists()


def test_cli_prompt_digits_on_a_run_without_text_is_an_error(tmp_path, cached_classifier_env, capsys):
    run = tmp_path / "run"
    minild.Pipeline.from_config(tiny_config(model={"num_classes": 10})).save_pretrained(run)
    assert main(["experiment", "prompt-digits", str(run)]) == 2
    assert "not a text-conditioned run" in capsys.readouterr().err


# ---------------------------------------------------------------------------- prompt frontier


class RealTextDigitsPipeline(RealDigitsPipeline):
    """The perfect generator behind a text model's interface: prompts name their digit."""

    def __init__(self, templates=("{name}", "the number {name}")):
        super().__init__(num_classes=None)
        self.model = SimpleNamespace(cross_attention_dim=4)
        self.config = SimpleNamespace(data=SimpleNamespace(prompt_templates=list(templates)), guidance=None,
                                      sampler=SimpleNamespace(name="ddim"))


def test_prompt_phrasings_add_held_out_ones_that_are_not_training_templates():
    from minild.evaluation.prompts import HELD_OUT_TEMPLATES, prompt_phrasings

    pairs = prompt_phrasings(RealTextDigitsPipeline())
    assert [template for template, held_out in pairs if held_out] == [t for t in HELD_OUT_TEMPLATES]
    assert [template for template, held_out in pairs if not held_out] == ["{name}", "the number {name}"]
    assert prompt_phrasings(RealTextDigitsPipeline(), ["{name}", "draw {label}"]) == [("{name}", False),
                                                                                      ("draw {label}", True)]
    with pytest.raises(ValueError, match="names no digit"):
        prompt_phrasings(RealTextDigitsPipeline(), ["a digit"])


def test_prompt_frontier_scores_methods_scales_and_phrasings_and_pools_the_held_out_ones(tmp_path, classifier):
    from minild.evaluation.prompts import run_prompt_frontier

    pipeline = RealTextDigitsPipeline()
    rows = run_prompt_frontier(pipeline, methods=["cfg", "apg"], guidance_scales=(1.0, 3.0),
                               phrasings=["{name}", "the digit {label}"], per_class=3, batch_size=64,
                               out_dir=tmp_path, classifier=classifier)
    single = [row for row in rows if "pooled" not in row["phrasing"]]
    assert [(row["method"], row["guidance_scale"], row["phrasing"], row["held_out"]) for row in single[:2]] == [
        ("cfg", 1.0, "{name}", False), ("cfg", 1.0, "the digit {label}", True)]
    assert len(single) == 2 * 2 * 2 and len(rows) == len(single) + 2 * 2 * 2
    prompted = [call for call in pipeline.calls if call["guidance"] == "apg"]
    assert prompted and all(call["guidance_scale"] in (1.0, 3.0) for call in prompted)
    for row in single:
        assert row["num_images"] == 30 and row["mean_accuracy"] > 0.8  # real digits
        assert row["floor_digit_fid"] == real_digits_baseline(
            classifier, 30, metrics.digit_features(classifier, (load_dataset("digits", split="test").images + 1) / 2)
        )["digit_fid"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| cfg | 3 | the digit {label} | yes | 30 |" in markdown and "held-out (pooled) | yes | 30 |" in markdown
    assert (tmp_path / "frontier.png").stat().st_size > 10_000 and (tmp_path / "results.csv").is_file()


def test_prompt_frontier_needs_a_text_model(classifier):
    from minild.evaluation.prompts import run_prompt_frontier

    with pytest.raises(ValueError, match="needs a text-conditioned model"):
        run_prompt_frontier(RealDigitsPipeline(), classifier=classifier)


def test_cli_cfg_digits_on_a_student_plots_its_frontier_beside_the_teachers(tmp_path, cached_classifier_env, capsys):
    teacher = tmp_path / "teacher"
    minild.Pipeline.from_config(tiny_config(model={"num_classes": 10}, train={"p_uncond": 0.1})).save_pretrained(teacher)
    assert main(["distill", str(teacher), "--out", str(tmp_path / "student"), "--steps", "1", "--phase-iterations",
                 "1", "--batch-size", "4"]) == 0
    capsys.readouterr()
    assert main(["experiment", "cfg-digits", str(tmp_path / "student"), "--per-class", "1", "--scales", "1", "3",
                 "--batch-size", "10"]) == 0
    out = capsys.readouterr().out
    assert "| cfg · student | 3 |" in out and "| cfg · teacher | 3 |" in out  # the teacher from distill.json
    assert (tmp_path / "student" / "cfg_digits" / "frontier.png").is_file()
