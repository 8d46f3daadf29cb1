"""Merge methods on raw task vectors: equal to peft.utils.merge_utils where peft has them, else the defining property."""

from __future__ import annotations

import math

import pytest
import torch

from peftkit.core.errors import ConfigError
from peftkit.merging.methods import della_keep_probabilities, model_stock_t
from peftkit.merging.registry import MaskSource, check_weights, get_merge_method, make_options

merge_utils = pytest.importorskip("peft.utils.merge_utils")


def _tensors(n=3, shape=(12, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _run(name, tensors, weights=None, masks=None, **opts):
    m = get_merge_method(name)
    return m(tensors, weights, make_options(m, opts, len(tensors)), masks)


W = [0.7, -0.3, 1.2]


def test_task_arithmetic_equals_peft():
    t = _tensors()
    torch.testing.assert_close(_run("task_arithmetic", t, W), merge_utils.task_arithmetic(t, torch.tensor(W)))
    norm = _run("task_arithmetic", t, [1.0, 1.0, 2.0], normalize=True)
    torch.testing.assert_close(norm, (t[0] + t[1] + 2 * t[2]) / 4)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_magnitude_prune_equals_peft(density):
    t = _tensors()
    ref = merge_utils.magnitude_prune(t, torch.tensor(W), density)
    torch.testing.assert_close(_run("magnitude_prune", t, W, density=density), ref)


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_ties_equals_peft(sign, density):
    t = _tensors()
    ref = merge_utils.ties(t, torch.tensor(W), density, sign)
    torch.testing.assert_close(_run("ties", t, W, density=density, majority_sign_method=sign), ref)


def test_dare_linear_and_dare_ties_equal_peft_with_the_same_seed():
    t = _tensors()
    torch.manual_seed(11)
    ref = merge_utils.dare_linear(t, torch.tensor(W), 0.4)
    torch.testing.assert_close(_run("dare_linear", t, W, density=0.4, seed=11), ref)
    torch.manual_seed(5)
    ref = merge_utils.dare_ties(t, torch.tensor(W), 0.6, "frequency")
    out = _run("dare_ties", t, W, density=0.6, seed=5, majority_sign_method="frequency")
    torch.testing.assert_close(out, ref)


def test_dare_with_given_masks():
    t = _tensors(2)
    masks = [torch.ones_like(t[0]), torch.zeros_like(t[1])]
    out = _run("dare_linear", t, [1.0, 1.0], masks=MaskSource(masks=masks), density=0.5)
    torch.testing.assert_close(out, t[0] / 0.5)
    with pytest.raises(ConfigError, match="masks were given"):
        _run("dare_linear", t, [1.0, 1.0], masks=MaskSource(masks=masks[:1]), density=0.5)


def test_breadcrumbs_keeps_the_band_between_outliers_and_small_entries():
    x = torch.arange(1.0, 101.0)  # magnitudes 1..100
    out = _run("breadcrumbs", [x], [1.0], density=0.5, gamma=0.1)
    kept = out.nonzero().flatten() + 1
    assert kept.min() == 41 and kept.max() == 90 and kept.numel() == 50  # top 10 dropped, next 50 kept


def test_della_probabilities_and_expectation():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5, -1.0]])
    p = della_keep_probabilities(x, 0.5, 0.2)
    assert torch.allclose(p, torch.tensor([[0.3, 0.7, 0.6, 0.4, 0.5]]))
    # one input, lambda 1: the result is unbiased (E[mask/p] = 1)
    big = torch.randn(200, 200, generator=torch.Generator().manual_seed(0))
    outs = torch.stack([_run("della", [big], [1.0], density=0.5, epsilon=0.2, seed=s) for s in range(40)])
    assert (outs.mean(0) - big).abs().mean() < 0.15 * big.abs().mean()
    with pytest.raises(ConfigError, match="density ± epsilon"):
        make_options(get_merge_method("della"), {"density": 0.1, "epsilon": 0.2}, 2)


def test_pcb_is_a_convex_combination_and_identity_on_one_input():
    t = _tensors(3, (30,))
    out = _run("pcb", t, density=0.5)
    stacked = torch.stack(t)
    nz = out != 0
    assert bool(((out >= stacked.min(0).values - 1e-6) & (out <= stacked.max(0).values + 1e-6)).all())
    assert nz.float().mean() > 0.5  # entries kept by at least one task
    torch.testing.assert_close(_run("pcb", t[:1], density=1.0), t[0])


def test_model_stock_t_from_the_angle():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    assert model_stock_t([a, b]) == pytest.approx(0.0)
    assert model_stock_t([a, a]) == pytest.approx(1.0)
    c = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    cos = 1 / math.sqrt(2)
    assert model_stock_t([a, c]) == pytest.approx(2 * cos / (1 + cos))
    torch.testing.assert_close(_run("model_stock", [a, c]), (2 * cos / (1 + cos)) * (a + c) / 2)


def test_slerp_keeps_the_norm_of_orthogonal_unit_inputs():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    mid = _run("slerp", [a, b], t=0.5)
    torch.testing.assert_close(mid, torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))
    torch.testing.assert_close(_run("slerp", [a, b], t=0.0), a)
    torch.testing.assert_close(_run("slerp", [a, 2 * a], t=0.5), 1.5 * a)  # parallel: linear


def test_bad_options_and_weights_are_refused_with_the_culprit():
    ties = get_merge_method("ties")
    with pytest.raises(ConfigError, match="did you mean 'density'"):
        make_options(ties, {"densty": 0.5}, 2)
    with pytest.raises(ConfigError, match="option 'density' must be float"):
        make_options(ties, {"density": "high"}, 2)
    with pytest.raises(ConfigError, match=r"density must be in \(0, 1\]"):
        make_options(ties, {"density": 1.5}, 2)
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        get_merge_method("tise")
    with pytest.raises(ConfigError, match="2 weights for 3"):
        check_weights(ties, [1, 2], 3)
    with pytest.raises(ConfigError, match="every weight is 0"):
        check_weights(ties, [0, 0], 2)
    with pytest.raises(ConfigError, match="weight #2"):
        check_weights(ties, [1, float("nan")], 2)
    with pytest.raises(ConfigError, match="does not take weights"):
        check_weights(get_merge_method("model_stock"), [1, 1], 2)
    with pytest.raises(ConfigError, match="exactly 2"):
        check_weights(get_merge_method("slerp"), None, 3)
