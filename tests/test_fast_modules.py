"""``swap_(model, FastModulesConfig())``: whole models on the fused ops.

Checked on BERT, RoBERTa and MPNet, stock and pruned students (non-uniform heads and FFN widths,
factorized embedding): logits and gradients equal the stock model's, state-dict keys and saved
checkpoints are unchanged, pruning and importance tracking keep working on the swapped model, and
a short training run follows the stock loss curve.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest_compress import ARCHS, tiny_model
from transformers import AutoModelForSequenceClassification

import rosita_fast
from rosita_fast import FastModulesConfig, prune_, swap_
from rosita_fast.compress import compute_importance
from rosita_fast.modules import FastTransformerLayer, FusedEmbedding

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _batch(vocab: int = 80, batch: int = 3, length: int = 11, arch: str = "bert") -> dict:
    ids = torch.randint(3, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    pad = 1 if arch in ("roberta", "mpnet") else 0
    ids = ids.masked_fill(mask == 0, pad)
    out = {"input_ids": ids, "attention_mask": mask}
    if arch == "bert":
        out["token_type_ids"] = (torch.arange(length) > 5).long().expand(batch, length)
    return out


def _student(arch: str, **overrides):
    model = tiny_model(arch, "seq", **overrides)
    # Non-uniform heads (1, 3, 2 of 4) and FFN widths (5, 48, 17 of 48), factorized embedding.
    prune_(model, heads=[[2], [0, 1, 3], [1, 3]],
           ffn=[list(range(0, 40, 8)), list(range(48)), list(range(0, 48, 3))[:17]],
           embedding_rank=8)
    return model


def _models(arch: str, kind: str, **overrides):
    stock = tiny_model(arch, "seq", **overrides) if kind == "stock" else _student(arch, **overrides)
    fast = copy.deepcopy(stock)
    report = swap_(fast, FastModulesConfig())
    return stock, fast, report


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kind", ["stock", "student"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_stock(arch, kind):
    stock, fast, report = _models(arch, kind)
    assert sum(isinstance(m, FastTransformerLayer) for m in fast.modules()) == 3
    assert sum(isinstance(m, FusedEmbedding) for m in fast.modules()) == 1
    assert len(report.layers) == 4
    batch = _batch(arch=arch)
    with torch.no_grad():
        ref = stock(**batch).logits
        out = fast(**batch).logits
        again = fast(**batch).logits  # second call: cached fused/packed weights
    assert _rel(out, ref) < 1e-5
    assert torch.equal(out, again)


def _fused_adamw_step(model) -> None:
    # torch's fused kernel writes the parameters without bumping their version counters.
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    versions = [p._version for p in params]
    torch.optim.AdamW(params, lr=0.05, fused=True).step()
    assert [p._version for p in params] == versions  # the case the version check cannot see


@pytest.mark.parametrize("write", ["fused_adamw", "data"])
def test_inference_caches_see_writes_that_bypass_version_counters(write):
    stock, fast, _ = _models("bert", "student")
    fast.eval()
    batch = _batch()
    with torch.no_grad():
        before = fast(**batch).logits  # fills the caches of fused and packed weights
    if write == "fused_adamw":
        _fused_adamw_step(fast)
    else:
        with torch.no_grad():
            for p in fast.parameters():
                p.data.add_(0.05 * torch.randn_like(p))
    fast.train()  # the mode switches of a training loop around its update and evaluation
    fast.eval()
    stock.load_state_dict(fast.state_dict())
    stock.eval()
    with torch.no_grad():
        out, ref = fast(**batch).logits, stock(**batch).logits
    assert _rel(out, before) > 1e-3
    assert _rel(out, ref) < 1e-5


def test_setting_the_same_mode_keeps_the_inference_caches():
    # A teacher is put in eval mode before every forward: that must not repack its weights.
    _, fast, _ = _models("bert", "student")
    fast.eval()
    with torch.no_grad():
        fast(**_batch())
    owners = [m for m in fast.modules() if hasattr(m, "_derived")]
    cached = [dict(m._derived._entries) for m in owners]
    assert owners and all(cached)
    fast.eval()
    assert [m._derived._entries for m in owners] == cached
    fast.train()
    assert not any(m._derived._entries for m in owners)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_match_stock(arch):
    stock, fast, _ = _models(arch, "student", **NO_DROPOUT)
    batch = _batch(arch=arch)
    labels = torch.tensor([0, 2, 1])
    for model in (stock, fast):
        model.train()
        model(**batch, labels=labels).loss.backward()
    fast_params = dict(fast.named_parameters())
    assert set(fast_params) == {n for n, _ in stock.named_parameters()}
    # The key bias's gradient is zero in exact arithmetic (softmax ignores a per-row constant):
    # rounding noise there is judged against the scale of the whole gradient.
    scale = torch.stack([p.grad.norm() for p in stock.parameters()]).norm()
    for name, p in stock.named_parameters():
        g = fast_params[name].grad
        assert g is not None, name
        assert (g - p.grad).norm() <= 1e-4 * max(p.grad.norm(), 1e-3 * scale), name


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_and_checkpoint_unchanged(arch, tmp_path):
    stock, fast, _ = _models(arch, "student")
    assert list(fast.state_dict()) == list(stock.state_dict())
    fast.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not rosita_fast.fast_modules.is_fast(reloaded)
    batch = _batch(arch=arch)
    with torch.no_grad():
        assert _rel(reloaded(**batch).logits, stock(**batch).logits) < 1e-6


def test_pruning_a_swapped_model():
    stock, fast, _ = _models("bert", "stock")
    for model in (stock, fast):
        prune_(model, heads=[[0, 3], [0, 1, 2]], ffn=[[1, 5, 9], [0]], layers=[0, 2])
    assert sum(isinstance(m, FastTransformerLayer) for m in fast.modules()) == 2
    batch = _batch()
    with torch.no_grad():
        assert _rel(fast(**batch).logits, stock(**batch).logits) < 1e-5


def test_pruning_schedule_keeps_optimizer_on_swapped_model():
    from rosita_fast import PruningSchedule

    torch.manual_seed(0)
    model = tiny_model("bert", "seq", **NO_DROPOUT).train()
    swap_(model, FastModulesConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = PruningSchedule.width(model, heads=2, ffn=16, total_steps=6, prune_fraction=0.5,
                                     optimizer_state="keep_unpruned")
    batch, labels = _batch(), torch.tensor([0, 1, 2])
    ln = model.bert.encoder.layer[0].output.LayerNorm.weight
    for _ in range(6):
        schedule.step(model, optimizer)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert schedule.done
    assert all(len(layer.attention.self.query.weight) == 2 * 8
               for layer in model.bert.encoder.layer)
    assert all(isinstance(layer, FastTransformerLayer) for layer in model.bert.encoder.layer)
    # Unpruned parameters keep their objects and their Adam state.
    assert model.bert.encoder.layer[0].output.LayerNorm.weight is ln
    assert "exp_avg" in optimizer.state[ln]
    live = {id(p) for p in model.parameters()}
    assert all(id(p) in live for g in optimizer.param_groups for p in g["params"])


@pytest.mark.parametrize("method", ["taylor", "mask"])
def test_importance_on_swapped_model(method):
    stock, fast, _ = _models("bert", "stock", **NO_DROPOUT)
    batch = _batch()
    batch["labels"] = torch.tensor([0, 1, 2])
    scores = [compute_importance(m, [batch], method=method) for m in (stock, fast)]
    for a, b in zip(scores[0].heads, scores[1].heads, strict=True):
        assert _rel(torch.as_tensor(b), torch.as_tensor(a)) < 1e-4
    for a, b in zip(scores[0].ffn, scores[1].ffn, strict=True):
        assert _rel(torch.as_tensor(b), torch.as_tensor(a)) < 1e-4


def test_training_with_dropout_stays_fused(monkeypatch):
    # Dropout runs inside the fused attention and output blocks: every path stays fused in
    # training, the ops get the config's probabilities, and the masks follow torch.manual_seed.
    _, fast, _ = _models("bert", "stock")  # HF default dropout 0.1
    layer = fast.bert.encoder.layer[0]
    assert all(layer.eval().fused_paths().values())
    assert all(layer.train().fused_paths().values())
    from rosita_fast.modules import attention as attention_module
    from rosita_fast.modules import ffn as ffn_module

    seen = []
    for module in (attention_module, ffn_module):
        for name in ("attention", "linear_residual_layernorm"):
            real = getattr(module, name, None)
            if real is None:
                continue
            monkeypatch.setattr(
                module, name,
                lambda *a, _real=real, _name=name, **kw: seen.append((_name, kw["dropout_p"]))
                or _real(*a, **kw))
    fast.train()
    batch, labels = _batch(), torch.tensor([0, 1, 2])
    torch.manual_seed(0)
    loss = fast(**batch, labels=labels).loss
    assert sorted(set(seen)) == [("attention", 0.1), ("linear_residual_layernorm", 0.1)]
    torch.manual_seed(0)
    assert torch.equal(fast(**batch, labels=labels).loss, loss)
    torch.manual_seed(1)
    assert not torch.equal(fast(**batch, labels=labels).loss, loss)
    loss.backward()
    assert fast.bert.encoder.layer[0].attention.self.query.weight.grad.isfinite().all()
    seen.clear()
    with torch.no_grad():
        fast.eval()(**batch)
    assert {p for _, p in seen} == {0.0}


def test_swap_refuses_unsupported_models():
    model = tiny_model("bert", "seq", num_attention_heads=8)  # head size 4
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="head size"):
        swap_(model, FastModulesConfig())
    assert not rosita_fast.fast_modules.is_fast(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="hidden_act"):
        swap_(tiny_model("bert", "seq", hidden_act="silu"), FastModulesConfig())
    _, fast, _ = _models("bert", "stock")
    with pytest.raises(ValueError, match="attention probabilities"):
        fast(**_batch(), output_attentions=True)


def test_swap_is_idempotent_and_selectable():
    model = tiny_model("bert", "seq")
    report = swap_(model, FastModulesConfig(embeddings=False),
                   filter_fn=lambda m, name: name.endswith("layer.1"))
    assert [s.name for s in report.layers] == ["bert.encoder.layer.1"]
    assert swap_(model, FastModulesConfig(embeddings=False),
                 filter_fn=lambda m, name: name.endswith("layer.1")).layers == []
    report = swap_(model, FastModulesConfig())
    assert len(report.layers) == 3  # embeddings + the two layers left


def test_fast_layer_compiles_fullgraph():
    _, fast, _ = _models("bert", "student")
    layer = fast.bert.encoder.layer[1]
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        ref = layer.run(x, mask)
        out = torch.compile(layer.run, fullgraph=True, backend="aot_eager")(x, mask)
    assert _rel(out, ref) < 1e-6


def test_training_follows_the_stock_loss_curve():
    torch.manual_seed(0)
    stock = _student("bert", **NO_DROPOUT).train()
    fast = copy.deepcopy(stock)
    swap_(fast, FastModulesConfig())
    generator = torch.Generator().manual_seed(1)
    data = []
    for _ in range(8):
        batch = _batch(batch=8, length=12)
        batch["input_ids"] = torch.randint(3, 80, (8, 12), generator=generator)
        # A learnable rule: the label is the first token id modulo 3.
        batch["labels"] = batch["input_ids"][:, 0] % 3
        data.append(batch)
    curves = []
    for model in (stock, fast):
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        losses = []
        for step in range(200):
            loss = model(**data[step % len(data)]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    smooth = [c.unfold(0, 20, 20).mean(1) for c in curves]
    assert smooth[0][-1] < 0.5 * smooth[0][0]  # the task is learnt
    assert (smooth[1] - smooth[0]).abs().max() < 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_are_recorded(arch):
    stock = _student(arch)
    batch = _batch(arch=arch)
    with torch.no_grad():
        ref = stock(**batch, output_hidden_states=True).hidden_states
        fast = copy.deepcopy(stock)  # its recording hooks were installed on the stock layers
        swap_(fast, FastModulesConfig())
        out = fast(**batch, output_hidden_states=True).hidden_states
    assert len(out) == len(ref) == 4
    for a, b in zip(out, ref, strict=True):
        assert _rel(a, b) < 1e-5


def test_stock_copy_and_onnx_export_of_a_swapped_model(tmp_path):
    from rosita_fast.export import export_onnx, onnx_session, run_onnx
    from rosita_fast.fast_modules import is_fast, stock_copy

    stock, fast, _ = _models("bert", "student")
    back = stock_copy(fast)
    assert not is_fast(back) and is_fast(fast)
    batch = _batch()
    with torch.no_grad():
        ref = stock(**batch).logits
        assert _rel(back(**batch).logits, ref) < 1e-6
    path = export_onnx(fast, tmp_path / "fast.onnx")
    assert _rel(run_onnx(onnx_session(path), batch), ref) < 1e-5
