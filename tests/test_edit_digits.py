"""The edit-digits experiment: inpainting and SDEdit of held-out digits on a tiny random
class-conditional pipeline, scored by a nearest-neighbour stand-in for the digit classifier, and
``minild experiment edit-digits`` end to end."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

import minild
from minild.cli import main
from minild.data import load_dataset
from minild.evaluation import editing
from minild.evaluation.editing import region_masks, run_edit_digits
from tests.conftest import tiny_class_pipeline, tiny_config, tiny_latent_class_pipeline

CELL = 28 + 2  # an image and its padding, before the grid enlarges it

pytestmark = pytest.mark.filterwarnings(
    "ignore:classifier-free guidance with a model trained without condition dropout")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class NearestTestDigit:
    """Stands in for the digit classifier: the label of the nearest held-out test digit (L2), so a
    held-out digit is read as its own class exactly and an edit as the digit it came closest to."""

    info = {"test_accuracy": 1.0}

    def __init__(self):
        test = load_dataset("digits", split="test")
        self.images, self.labels = ((test.images + 1) / 2).flatten(1), test.labels  # [500, 784], [500]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        nearest = torch.cdist(x.flatten(1), self.images).argmin(dim=1)  # [B]
        return torch.nn.functional.one_hot(self.labels[nearest], 10).float()  # logits [B, 10]


class RecordingPipeline:
    """The pipeline, with every ``generate`` call's labels, masks, strength and seed recorded."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, **kwargs):
        self.calls.append({**kwargs, "seed": kwargs["generator"].initial_seed()})
        return self.pipe.generate(**kwargs)


@pytest.fixture(scope="module")
def pipe():
    return tiny_class_pipeline()


@pytest.fixture(scope="module")
def classifier():
    return NearestTestDigit()


@pytest.fixture(scope="module")
def written(pipe, classifier, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit_digits")
    recording = RecordingPipeline(pipe)
    rows = run_edit_digits(recording, per_class=1, strengths=(0.0, 0.5, 1.0), num_inference_steps=2, batch_size=6,
                           out_dir=out, classifier=classifier)
    return rows, out, recording.calls


def test_one_row_per_cell_inpainting_then_sdedit(written):
    rows, _, _ = written
    assert [(row["kind"], row["region"], row["towards"]) for row in rows[:6]] == [
        ("inpaint", region, towards) for region in ("lower", "upper", "box") for towards in ("true", "other")]
    assert [(row["kind"], row["strength"], row["steps_run"]) for row in rows[6:]] == [
        ("sdedit", 0.0, 0), ("sdedit", 0.5, 1), ("sdedit", 1.0, 2)]
    assert all(row["num_images"] == 10 for row in rows)


def test_results_markdown_csv_plot_and_grid_are_written(written):
    rows, out, _ = written
    assert {path.name for path in out.iterdir()} == {"results.md", "results.csv", "plot.png", "grid.png"}
    with (out / "results.csv").open() as file:
        table = list(csv.DictReader(file))
    assert [line["kind"] for line in table] == ["inpaint"] * 6 + ["sdedit"] * 3
    assert table[7]["strength"] == "0.5" and table[7]["region"] == "" and table[0]["kept_max_abs_diff"] == "0.0"
    markdown = (out / "results.md").read_text()
    assert "| region | towards | n | reads as guided | reads as original |" in markdown
    assert "| strength | steps run | n | class change | reads as original | mean \\|Δ\\| |" in markdown
    assert "| box | other | 10 |" in markdown and "| 0.5 | 1 | 10 |" in markdown
    assert "n = 10 per cell" in markdown and "ddim with 2 inference steps" in markdown
    # rows: input, 3 × (mask, towards true, towards other), 3 strengths; 10 columns, enlarged
    width, height = Image.open(out / "grid.png").size
    assert width > 2 * 10 * CELL and height > 2 * 13 * CELL
    assert Image.open(out / "plot.png").size[0] > 500


def test_inpainting_keeps_the_unmasked_pixels_exactly_and_changes_the_region(written):
    rows, _, _ = written
    for row in rows[:6]:
        assert row["kept_max_abs_diff"] == 0.0 and row["kept_mean_abs_diff"] == 0.0
        assert row["mean_abs_diff"] > 0.01  # a random model redraws the region


def test_strength_zero_returns_the_input_and_one_moves_furthest(written):
    rows, _, _ = written
    still, half, full = rows[6:]
    assert still["mean_abs_diff"] == 0.0
    assert still["reads_as_original"] == 1.0 and still["reads_as_guided"] == 0.0  # the other class is never its own
    assert 0 < half["mean_abs_diff"] < full["mean_abs_diff"]


def test_edits_are_guided_towards_the_own_class_or_another_and_every_cell_starts_from_the_same_noise(written):
    _, _, calls = written
    assert [len(call["class_labels"]) for call in calls] == [6, 4] * 9  # batches of at most 6
    assert {call["seed"] for call in calls[0::2]} == {0} and {call["seed"] for call in calls[1::2]} == {1}
    own = calls[0]["class_labels"] + calls[1]["class_labels"]
    other = calls[2]["class_labels"] + calls[3]["class_labels"]
    assert own == list(range(10))  # the held-out digits, classes interleaved
    assert all(o != d for o, d in zip(other, own)) and len(set(other)) > 1
    for first, second in zip(calls[2:4], calls[-2:]):  # inpainting and SDEdit go towards the same other class
        assert first["class_labels"] == second["class_labels"]
    assert all("mask" in call for call in calls[:12]) and all("mask" not in call for call in calls[12:])
    assert [call["strength"] for call in calls[12::2]] == [0.0, 0.5, 1.0]


def test_regions_are_the_halves_and_a_seeded_fourteen_pixel_box():
    lower = region_masks("lower", 2, torch.Generator().manual_seed(0))
    assert lower[:, :, 14:].eq(1).all() and lower[:, :, :14].eq(0).all()
    assert torch.equal(region_masks("upper", 2, torch.Generator()), 1 - lower)
    boxes = region_masks("box", 50, torch.Generator().manual_seed(0))
    assert boxes.shape == (50, 1, 28, 28) and bool((boxes.sum(dim=(1, 2, 3)) == 14 * 14).all())
    assert torch.equal(boxes, region_masks("box", 50, torch.Generator().manual_seed(0)))
    assert not torch.equal(boxes, region_masks("box", 50, torch.Generator().manual_seed(1)))
    assert len({tuple(torch.nonzero(mask[0])[0].tolist()) for mask in boxes}) > 10  # corners vary


def test_a_latent_model_keeps_the_unmasked_pixels_exactly(tmp_path, classifier):
    rows = run_edit_digits(tiny_latent_class_pipeline(tmp_path), per_class=1, strengths=(1.0,), regions=("box",),
                           num_inference_steps=2, classifier=classifier)
    assert rows[0]["kept_max_abs_diff"] == 0.0 and rows[0]["mean_abs_diff"] > 0.01


# ---------------------------------------------------------------------------- refusals


def test_a_model_that_is_not_class_conditional_is_refused(classifier):
    with pytest.raises(ValueError, match="needs a class-conditional digit model.*configs/digits_class_cfg.yaml"):
        run_edit_digits(minild.Pipeline.from_config(tiny_config()), classifier=classifier)


def test_a_pipeline_that_does_not_make_28_pixel_digits_is_refused(classifier):
    config = tiny_config(model={"num_classes": 10})
    config["image_shape"] = [1, 16, 16]
    with pytest.raises(ValueError, match="edits 1×28×28 digits; this pipeline makes 1×16×16 images"):
        run_edit_digits(minild.Pipeline.from_config(config), classifier=classifier)


@pytest.mark.parametrize("kwargs, message", [
    ({"strengths": (0.5, 1.5)}, "strengths must lie in \\[0, 1\\].*got 1.5"),
    ({"strengths": (-0.1,)}, "strengths must lie in \\[0, 1\\]"),
    ({"strengths": ()}, "strengths must be a non-empty list"),
    ({"strengths": 0.5}, "strengths must be a non-empty list"),
    ({"regions": ("lower", "left")}, "unknown region 'left': the regions are lower, upper, box"),
    ({"regions": ("box", "box")}, "regions names a region twice"),
    ({"regions": "box"}, "regions must be a non-empty list"),
    ({"per_class": 0}, "per_class must be a positive integer, got 0"),
    ({"per_class": 51}, "per_class=51 but the held-out test split has only 50"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"guidance_scale": -1.0}, "guidance_scale must be finite and 0 or more"),
    ({"seed": -1}, "seed must lie in \\[0, 2\\*\\*64\\)"),
])
def test_bad_arguments_are_value_errors_before_any_image_is_drawn(pipe, classifier, kwargs, message):
    recording = RecordingPipeline(pipe)
    with pytest.raises(ValueError, match=message):
        run_edit_digits(recording, classifier=classifier, num_inference_steps=2, **kwargs)
    assert recording.calls == []


# ---------------------------------------------------------------------------- command line


def test_cli_edit_digits_runs_a_saved_pipeline_end_to_end(pipe, classifier, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(editing, "load_digit_classifier", lambda: classifier)
    run = tmp_path / "run"
    pipe.save_pretrained(run)
    assert main(["experiment", "edit-digits", str(run), "--per-class", "1", "--strengths", "0,1",
                 "--regions", "lower,box", "--steps", "2", "--sampler", "ddpm", "--guidance-scale", "2"]) == 0
    out = capsys.readouterr().out
    assert "| lower | other | 10 |" in out and "| box | true | 10 |" in out and "| upper |" not in out
    assert "| 0 | 0 | 10 | 0.0% | 100.0% | 0.0000 |" in out  # strength 0: the inputs, read as themselves
    assert "ddpm with 2 inference steps, guidance scale 2" in out and f"wrote {run / 'edit_digits'}" in out
    assert {path.name for path in (run / "edit_digits").iterdir()} == {"results.md", "results.csv", "plot.png",
                                                                       "grid.png"}


@pytest.mark.parametrize("argv, message", [
    (["--strengths", "0.5,1.5"], "minild: error: strengths must lie in [0, 1]"),
    (["--regions", "lower,left"], "minild: error: unknown region 'left'"),
    (["--per-class", "0"], "minild: error: per_class must be a positive integer, got 0"),
])
def test_cli_edit_digits_refuses_bad_options_in_one_line(pipe, tmp_path, argv, message, capsys):
    run = tmp_path / "run"
    pipe.save_pretrained(run)
    assert main(["experiment", "edit-digits", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (run / "edit_digits").exists()


def test_cli_edit_digits_on_an_unconditional_run_is_an_error(tmp_path, capsys):
    run = tmp_path / "run"
    minild.Pipeline.from_config(tiny_config()).save_pretrained(run)
    assert main(["experiment", "edit-digits", str(run)]) == 2
    assert "configs/digits_class_cfg.yaml" in capsys.readouterr().err
