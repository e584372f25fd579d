"""The digit evaluator: classifier training and cache, accuracy, digit-FID, loss smoothness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minild.evaluation import metrics
from minild.data import load_dataset
from minild.evaluation.metrics import (
    DigitClassifier,
    classify,
    digit_fid,
    frechet_distance,
    load_digit_classifier,
    loss_smoothness,
    mean_accuracy,
    per_class_accuracy,
)

# A few seconds of training instead of a minute: enough to read real digits well.
QUICK_TRAIN_STEPS = 40


_quick_caches: dict[int, Path] = {}


def quick_classifier_cache(tmp_path_factory) -> Path:
    """A cache folder with a classifier trained for QUICK_TRAIN_STEPS, once per test session
    (test_experiments shares it)."""
    if id(tmp_path_factory) not in _quick_caches:
        cache = tmp_path_factory.mktemp("minild_cache")
        load_digit_classifier(cache, train_steps=QUICK_TRAIN_STEPS)
        _quick_caches[id(tmp_path_factory)] = cache
    return _quick_caches[id(tmp_path_factory)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; see tests/conftest.py


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return quick_classifier_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return load_digit_classifier(cache_dir, train_steps=QUICK_TRAIN_STEPS)


@pytest.fixture(scope="module")
def test_digits():
    test = load_dataset("digits", split="test")
    return (test.images + 1) / 2, test.labels  # [500, 1, 28, 28] in [0, 1], [500]


# ---------------------------------------------------------------------------- classifier


def test_quickly_trained_classifier_beats_90_percent_on_the_test_split(classifier, test_digits):
    images, labels = test_digits
    accuracy = mean_accuracy(classify(classifier, images), labels)
    assert accuracy > 0.9
    assert classifier.info["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)


def test_classifier_outputs_logits_and_128_d_features():
    classifier = DigitClassifier().eval()
    images = torch.rand(3, 1, 28, 28)
    assert classifier(images).shape == (3, 10)
    assert classifier.features(images).shape == (3, 128)


def test_training_is_seeded_and_independent_of_the_thread_count():
    first, _ = metrics.train_digit_classifier(train_steps=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        second, _ = metrics.train_digit_classifier(train_steps=3)
        assert torch.get_num_threads() == 2  # restored after training on one thread
    finally:
        torch.set_num_threads(threads)
    for (name, tensor), expected in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(tensor, expected), name


def test_per_class_accuracy_on_real_test_digits(classifier, test_digits):
    images, labels = test_digits
    predicted = classify(classifier, images, batch_size=64)
    accuracies = per_class_accuracy(predicted, labels)
    assert len(accuracies) == 10
    assert min(accuracies) > 0.7
    # 50 test digits per class, so the mean of the classes is the overall accuracy.
    assert sum(accuracies) / 10 == pytest.approx(mean_accuracy(predicted, labels), abs=1e-6)


def test_per_class_accuracy_counts_each_class_and_marks_absent_ones_nan():
    predicted = torch.tensor([0, 0, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    accuracies = per_class_accuracy(predicted, labels, num_classes=4)
    assert accuracies[:3] == [0.5, 0.5, 1.0]
    assert accuracies[3] != accuracies[3]  # NaN: no images of class 3
    assert mean_accuracy(predicted, labels) == pytest.approx(4 / 6)


def test_classify_rejects_images_of_the_wrong_shape(classifier):
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        classify(classifier, torch.rand(2, 3, 28, 28))


# ---------------------------------------------------------------------------- cache


def test_cache_holds_safetensors_weights_and_a_json_report(cache_dir):
    assert (cache_dir / "digit_classifier.safetensors").is_file()
    info = json.loads((cache_dir / "digit_classifier.json").read_text())
    assert info["recipe"]["train_steps"] == QUICK_TRAIN_STEPS
    assert info["recipe"]["version"] == metrics.RECIPE_VERSION
    assert 0.9 < info["test_accuracy"] <= 1.0


def _refuse_to_train(*args, **kwargs):
    raise AssertionError("the cached classifier was retrained")


def test_second_load_reads_the_cache_without_training(cache_dir, classifier, monkeypatch):
    monkeypatch.setattr(metrics, "train_digit_classifier", _refuse_to_train)
    loaded = load_digit_classifier(cache_dir, train_steps=QUICK_TRAIN_STEPS)
    assert not loaded.training
    for (name, tensor), expected in zip(loaded.state_dict().items(), classifier.state_dict().values()):
        assert torch.equal(tensor, expected), name


def test_cache_default_dir_comes_from_minild_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("MINILD_CACHE", str(cache_dir))
    monkeypatch.setattr(metrics, "TRAIN_STEPS", QUICK_TRAIN_STEPS)
    monkeypatch.setattr(metrics, "train_digit_classifier", _refuse_to_train)
    assert load_digit_classifier().info["recipe"]["train_steps"] == QUICK_TRAIN_STEPS


def test_another_recipe_or_retrain_trains_again(tmp_path, cache_dir, monkeypatch):
    for name in ("digit_classifier.safetensors", "digit_classifier.json"):
        (tmp_path / name).write_bytes((cache_dir / name).read_bytes())
    calls = []

    def fake_train(train_steps):
        calls.append(train_steps)
        return DigitClassifier().eval(), {"recipe": metrics._recipe(train_steps), "test_accuracy": 0.1}

    monkeypatch.setattr(metrics, "train_digit_classifier", fake_train)
    load_digit_classifier(tmp_path, train_steps=QUICK_TRAIN_STEPS)
    assert calls == []
    load_digit_classifier(tmp_path, train_steps=QUICK_TRAIN_STEPS, retrain=True)
    load_digit_classifier(tmp_path, train_steps=7)
    assert calls == [QUICK_TRAIN_STEPS, 7]
    assert json.loads((tmp_path / "digit_classifier.json").read_text())["recipe"]["train_steps"] == 7


def test_cached_weights_that_do_not_fit_are_retrained(tmp_path, cache_dir, monkeypatch):
    (tmp_path / "digit_classifier.json").write_bytes((cache_dir / "digit_classifier.json").read_bytes())
    (tmp_path / "digit_classifier.safetensors").write_bytes(b"not safetensors")
    calls = []

    def fake_train(train_steps):
        calls.append(train_steps)
        return DigitClassifier().eval(), {"recipe": metrics._recipe(train_steps), "test_accuracy": 0.1}

    monkeypatch.setattr(metrics, "train_digit_classifier", fake_train)
    load_digit_classifier(tmp_path, train_steps=QUICK_TRAIN_STEPS)
    assert calls == [QUICK_TRAIN_STEPS]


# ---------------------------------------------------------------------------- digit-FID


def test_fid_of_a_set_with_itself_is_zero(classifier, test_digits):
    images, _ = test_digits
    assert digit_fid(classifier, images, images) == pytest.approx(0.0, abs=1e-6)


def test_fid_grows_as_images_are_noised(classifier, test_digits):
    images, _ = test_digits
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    first, second = images[::2], images[1::2]
    fids = [digit_fid(classifier, (first + level * noise[::2]).clamp(0, 1), second) for level in (0.0, 0.2, 0.5)]
    assert fids[0] < fids[1] < fids[2]


def test_fid_is_symmetric(classifier, test_digits):
    images, _ = test_digits
    first, second = images[:200], images[300:]
    assert digit_fid(classifier, first, second) == pytest.approx(digit_fid(classifier, second, first), rel=1e-6)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    reference = torch.randn(200, 8, generator=generator, dtype=torch.float64) @ torch.randn(
        8, 8, generator=generator, dtype=torch.float64) + 0.5
    mean1, cov1 = features.mean(0).numpy(), torch.cov(features.T).numpy()
    mean2, cov2 = reference.mean(0).numpy(), torch.cov(reference.T).numpy()
    expected = ((mean1 - mean2) ** 2).sum() + (cov1 + cov2 - 2 * linalg.sqrtm(cov1 @ cov2).real).trace()
    assert frechet_distance(features, reference) == pytest.approx(float(expected), rel=1e-8)


def test_frechet_distance_needs_two_images_per_set():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))


# ---------------------------------------------------------------------------- loss smoothness


def test_loss_smoothness_on_a_hand_made_curve():
    result = loss_smoothness([1.0, 0.5, 0.6, 0.3, 0.3])  # changes: -0.5, +0.1, -0.3, 0.0
    assert result["mean_abs_change"] == pytest.approx(0.9 / 4)
    assert result["max_increase"] == pytest.approx(0.1)
    assert result["num_increases"] == 1
    assert result["num_changes"] == 4
    assert result["monotonic"] is False


def test_loss_smoothness_of_a_falling_curve_and_of_one_epoch():
    assert loss_smoothness([0.9, 0.4, 0.2]) == {
        "mean_abs_change": pytest.approx(0.35), "max_increase": 0.0, "num_increases": 0, "num_changes": 2,
        "monotonic": True,
    }
    assert loss_smoothness([0.5])["num_changes"] == 0
