"""LowRankLinear, its SVD constructor, and swap_ on a Hugging Face BertModel."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from kernel_harness import assert_close, rand
from torch import nn

import rosita_fast
from rosita_fast import LowRankConfig, LowRankLinear, swap_
from rosita_fast.swap import layer_blocks


def _tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=80, max_position_embeddings=32,
    )
    return BertModel(cfg).eval()


def test_from_linear_full_rank_is_exact(seed):
    lin = nn.Linear(20, 12)
    low = LowRankLinear.from_linear(lin)
    assert low.rank == 12
    assert low.approximation_error < 1e-6
    x = rand(3, 7, 20)
    assert_close(low(x), lin(x), torch.float32, "full-rank factorization")


def test_from_linear_truncation_error_matches_frobenius(seed):
    lin = nn.Linear(40, 30)
    low = LowRankLinear.from_linear(lin, rank=9)
    w = lin.weight.detach().double()
    approx = low.u.detach().double() @ low.v.detach().double()
    measured = ((w - approx).norm() / w.norm()).item()
    assert low.approximation_error == pytest.approx(measured, rel=1e-4)
    # Eckart-Young: no rank-9 matrix is closer; a random rank-9 perturbation of the SVD is worse.
    noisy = approx + 1e-2 * torch.randn(30, 9, dtype=torch.float64) @ torch.randn(9, 40).double()
    assert ((w - noisy).norm() / w.norm()).item() > measured


def test_from_linear_energy_picks_smallest_rank(seed):
    lin = nn.Linear(32, 24)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    energy = 0.8
    low = LowRankLinear.from_linear(lin, energy=energy)
    kept = (s[: low.rank] ** 2).sum() / (s**2).sum()
    assert kept >= energy
    assert (s[: low.rank - 1] ** 2).sum() / (s**2).sum() < energy


def test_lowrank_linear_bad_arguments():
    with pytest.raises(ValueError, match="rank 13 exceeds min"):
        LowRankLinear(12, 20, 13)
    with pytest.raises(ValueError, match="rank must be an int"):
        LowRankLinear.from_linear(nn.Linear(8, 6), rank=7)
    with pytest.raises(ValueError, match="not both"):
        LowRankLinear.from_linear(nn.Linear(8, 6), rank=2, energy=0.5)
    with pytest.raises(ValueError, match="energy must be in"):
        LowRankLinear.from_linear(nn.Linear(8, 6), energy=1.5)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        LowRankLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_swap_full_rank_bert_outputs_unchanged(seed):
    model = _tiny_bert()
    ids = torch.randint(0, 99, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    report = swap_(model, LowRankConfig())
    n_linear = 2 * 6 + 1  # q k v o, intermediate, output per layer; pooler
    assert len(report.layers) == n_linear
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert all(layer.error < 1e-6 for layer in report.layers)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(after, before, torch.float32, "BERT after full-rank swap")
    assert report.params_after == sum(p.numel() for p in model.parameters())


def test_swap_rank_report_and_filter(seed):
    model = _tiny_bert()
    before = sum(p.numel() for p in model.parameters())
    report = swap_(model, LowRankConfig(rank=8), filter_fn=lambda m, name: "attention" in name)
    assert len(report.layers) == 2 * 4
    assert report.params_before == before
    saved = sum(layer.params_before - layer.params_after for layer in report.layers)
    assert report.params_after == before - saved
    for layer in report.layers:
        assert layer.rank == 8
        factors = 8 * (layer.in_features + layer.out_features)
        assert layer.params_after == factors + layer.out_features
        assert 0 < layer.error < 1
    assert isinstance(model.encoder.layer[0].intermediate.dense, nn.Linear)
    assert "8 layers replaced" in str(report)


def test_swap_error_leaves_model_untouched():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match="does not fit layer '2'"):
        swap_(model, LowRankConfig(rank=4))
    assert all(type(model[i]) is nn.Linear for i in (0, 2))


def test_swapped_model_trains(seed):
    model = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 3))
    swap_(model, LowRankConfig(rank=6), filter_fn=lambda m, name: name == "0")
    assert isinstance(model[0], LowRankLinear)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = rand(64, 24), torch.randint(0, 3, (64,))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_config_validation():
    with pytest.raises(ValueError):
        LowRankConfig(rank=0)
    with pytest.raises(ValueError):
        LowRankConfig(rank=4, energy=0.9)
    with pytest.raises(TypeError, match="SwapConfig"):
        rosita_fast.swap_(nn.Linear(2, 2), {"rank": 2})


class _FFNInputTwin(nn.Module):
    """Test-only replacement for a whole BERT FFN-input block (linear + activation)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.dense = block.dense
        self.act = block.intermediate_act_fn

    def forward(self, hidden_states):
        return self.act(self.dense(hidden_states))


@dataclass
class _FFNBlockConfig(rosita_fast.SwapConfig):
    pass


class _FFNBlockSubConfig(_FFNBlockConfig):
    pass


class _Unregistered(rosita_fast.SwapConfig):
    pass


@rosita_fast.register_swap_handler(
    _FFNBlockConfig, targets=lambda model: layer_blocks(model, "intermediate")
)
def _swap_ffn_block(module, config, name):
    return _FFNInputTwin(module)


@pytest.mark.parametrize("config", [_FFNBlockConfig(), _FFNBlockSubConfig()], ids=type)
def test_swap_dispatches_on_config_type_to_whole_blocks(config, seed):
    # A handler found through the adapters replaces whole blocks, not nn.Linear layers;
    # a config subclass uses its parent's handler.
    model = _tiny_bert()
    ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    report = swap_(model, config, filter_fn=lambda m, name: name.startswith("encoder.layer.1"))
    assert [s.name for s in report.layers] == ["encoder.layer.1.intermediate"]
    assert report.layers[0].replaced == "BertIntermediate -> _FFNInputTwin"
    assert isinstance(model.encoder.layer[1].intermediate, _FFNInputTwin)
    assert not isinstance(model.encoder.layer[0].intermediate, _FFNInputTwin)
    with torch.no_grad():
        after = model(input_ids=ids).last_hidden_state
    assert torch.equal(after, before)


def test_swap_unregistered_config_is_type_error():
    with pytest.raises(TypeError, match="no handler is registered for _Unregistered"):
        swap_(nn.Linear(2, 2), _Unregistered())
    with pytest.raises(TypeError, match="not a SwapConfig subclass"):
        rosita_fast.register_swap_handler(dict)


def test_swapped_bert_runs_under_cpu_autocast(seed):
    model = _tiny_bert()
    ids = torch.randint(0, 99, (2, 11))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    swap_(model, LowRankConfig())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids).last_hidden_state
    # Whole-model bf16: a few bf16 roundings per layer, far from fp32 but far from wrong.
    err = ((out.float() - expected).norm() / expected.norm()).item()
    assert err < 0.05, err
