"""KID: the unbiased MMD² with the cubic polynomial kernel, against a plain double-loop
transcription of Bińkowski et al. 2018's estimator and a value computed by hand."""

from __future__ import annotations

import pytest
import torch

from minild.evaluation.kid import kernel_inception_distance, polynomial_kernel


def naive_kid(x: list[list[float]], y: list[list[float]]) -> float:
    """MMD²_u written as the paper's three sums, one pair at a time."""
    d = len(x[0])

    def k(a, b):
        return (sum(p * q for p, q in zip(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_double_loop_transcription_of_the_unbiased_estimator():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(9, 5, generator=generator, dtype=torch.float64) + 0.3
    assert kernel_inception_distance(x, y) == pytest.approx(naive_kid(x.tolist(), y.tolist()), rel=1e-12)


def test_kid_of_a_hand_computed_pair_of_one_dimensional_sets():
    # d = 1, x = {0, 1}, y = {0, 2}: k(a, b) = (ab + 1)³.
    # within x: k(0, 1) = 1, twice over 2·1 pairs → 1; within y: k(0, 2) = 1 → 1;
    # across: k(0,0) + k(0,2) + k(1,0) + k(1,2) = 1 + 1 + 1 + 27 = 30, over 4 → 7.5.
    # MMD²_u = 1 + 1 − 2 · 7.5 = −13.
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    assert kernel_inception_distance(x, y) == pytest.approx(-13.0)


def test_kid_is_unbiased_near_zero_for_two_draws_of_one_distribution_at_small_n():
    generator = torch.Generator().manual_seed(1)
    estimates = [kernel_inception_distance(torch.randn(20, 8, generator=generator),
                                           torch.randn(20, 8, generator=generator)) for _ in range(200)]
    mean = sum(estimates) / len(estimates)
    spread = (sum((e - mean) ** 2 for e in estimates) / len(estimates)) ** 0.5
    assert abs(mean) < 3 * spread / len(estimates) ** 0.5  # zero within three standard errors


def test_kid_grows_with_the_distance_between_the_sets():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(50, 4, generator=generator)
    near, far = x + 0.1, x + 1.0
    assert kernel_inception_distance(x, far) > kernel_inception_distance(x, near)


def test_polynomial_kernel_is_the_cubic_of_the_scaled_dot_product_plus_one():
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0], [0.0, 0.0]])
    assert polynomial_kernel(x, y).tolist() == [[(1 / 2 + 1) ** 3, 1.0]]


@pytest.mark.parametrize("x, y", [(torch.zeros(1, 3), torch.zeros(4, 3)), (torch.zeros(4, 3), torch.zeros(4, 2))])
def test_kid_refuses_single_images_and_mismatched_feature_sizes(x, y):
    with pytest.raises(ValueError, match="KID needs"):
        kernel_inception_distance(x, y)
