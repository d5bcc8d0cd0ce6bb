"""Reference loss terms against float64 recomputation and gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rosita_fast.distill import (
    attention_mse,
    gold_label_loss,
    hidden_mse,
    kl_divergence,
    logits_mse,
    soft_cross_entropy,
)


def _np_log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _logits(seed, batch=6, classes=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=g, dtype=dtype) * 3,
            torch.randn(batch, classes, generator=g, dtype=dtype) * 3)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("classes", [2, 3])
def test_soft_cross_entropy_matches_float64(temperature, classes):
    s, t = _logits(classes, classes=classes)
    s64, t64 = s.double().numpy() / temperature, t.double().numpy() / temperature
    per_row = -(np.exp(_np_log_softmax(t64)) * _np_log_softmax(s64)).sum(-1)
    expected = per_row.mean()
    got = soft_cross_entropy(s, t, temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Quirk 7.3: averaging over classes is the sum divided by the number of classes.
    assert soft_cross_entropy(s, t, temperature, mean_over_classes=True).item() == pytest.approx(
        expected / classes, rel=1e-5)
    assert soft_cross_entropy(s, t, temperature, scale_by_t2=True).item() == pytest.approx(
        expected * temperature**2, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_matches_float64_and_differs_from_ce_by_teacher_entropy(temperature):
    s, t = _logits(11, classes=4)
    ls = _np_log_softmax(s.double().numpy() / temperature)
    lt = _np_log_softmax(t.double().numpy() / temperature)
    expected = (np.exp(lt) * (lt - ls)).sum(-1).mean()
    assert kl_divergence(s, t, temperature).item() == pytest.approx(expected, rel=1e-5)
    entropy = -(np.exp(lt) * lt).sum(-1).mean()
    ce = soft_cross_entropy(s, t, temperature).item()
    assert ce - entropy == pytest.approx(expected, rel=1e-4)
    assert kl_divergence(t, t, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_prediction_losses_pass_gradcheck():
    s, t = _logits(3, batch=4, classes=3, dtype=torch.float64)
    s.requires_grad_(True)
    for temperature in (1.0, 2.0):
        assert torch.autograd.gradcheck(lambda x, T=temperature: soft_cross_entropy(x, t, T), (s,))
        assert torch.autograd.gradcheck(lambda x, T=temperature: kl_divergence(x, t, T), (s,))
    assert torch.autograd.gradcheck(
        lambda x: soft_cross_entropy(x, t, 1.0, mean_over_classes=True), (s,))


def _mask(batch, seq, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq + 1, size=batch)
    lengths[0] = seq
    return torch.tensor((np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64))


def test_hidden_mse_with_and_without_padding():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 7, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    mask = _mask(3, 7, seed=1)
    diff = (s.double() - t.double()).numpy() ** 2
    m = mask.numpy().astype(bool)
    assert hidden_mse(s, t, mask).item() == pytest.approx(diff[m].mean(), rel=1e-6)
    assert hidden_mse(s, t).item() == pytest.approx(diff.mean(), rel=1e-6)
    # Padding content must not matter when masked.
    t2 = t.clone()
    t2[~mask.bool()] = 100.0
    assert hidden_mse(s, t2, mask).item() == pytest.approx(hidden_mse(s, t, mask).item())
    s64 = s.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: hidden_mse(x, t.double(), mask), (s64,))


def test_attention_mse_counts_only_real_query_key_pairs():
    g = torch.Generator().manual_seed(9)
    s = torch.softmax(torch.randn(2, 3, 6, 6, generator=g), -1)
    t = torch.softmax(torch.randn(2, 3, 6, 6, generator=g), -1)
    mask = _mask(2, 6, seed=4)
    total = count = 0.0
    for b in range(2):
        n = int(mask[b].sum())
        block = (s[b, :, :n, :n].double() - t[b, :, :n, :n].double()) ** 2
        total += block.sum().item()
        count += block.numel()
    assert attention_mse(s, t, mask).item() == pytest.approx(total / count, rel=1e-6)
    assert attention_mse(s, t).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)
    s64 = s.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: attention_mse(x, t.double(), mask), (s64,))


def test_gold_label_loss_classification_and_regression():
    s, _ = _logits(2, batch=5, classes=3)
    labels = torch.tensor([0, 2, 1, -100, 2])
    ls = _np_log_softmax(s.double().numpy())
    keep = [0, 1, 2, 4]
    expected = -np.mean([ls[i, labels[i].item()] for i in keep])
    assert gold_label_loss(s, labels).item() == pytest.approx(expected, rel=1e-5)
    reg = torch.tensor([[1.0], [2.5], [4.0]])
    target = torch.tensor([1.5, 2.0, 5.0])
    assert gold_label_loss(reg, target).item() == pytest.approx((0.25 + 0.25 + 1.0) / 3)
    assert logits_mse(reg, target[:, None]).item() == pytest.approx((0.25 + 0.25 + 1.0) / 3)


def test_low_precision_inputs_are_computed_in_float32():
    s, t = _logits(8)
    got = soft_cross_entropy(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(soft_cross_entropy(s.bfloat16().float(),
                                                          t.bfloat16().float()).item())


def test_bad_arguments_raise():
    s, t = _logits(1)
    with pytest.raises(ValueError, match="student shape"):
        soft_cross_entropy(s, t[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        kl_divergence(s, t, 0.0)
    with pytest.raises(ValueError, match="attention mask shape"):
        hidden_mse(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 4))
