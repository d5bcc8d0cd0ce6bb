"""``first_token_output``: a fast sequence classifier's last layer computing its first position.

Against the same fast model computing every position (and the stock model), in float64: logits and
every parameter's gradient match for BERT, RoBERTa and MPNet (relative position bias), stock and
pruned students, in eval and training mode; the flag is scoped to the block and survives an
exception; what it refuses; and the places that use it (evaluation, the teacher's forward, the
trainer's student forward with logits-only losses) compute the same numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest_compress import ARCHS, tiny_model
from test_fast_modules import NO_DROPOUT, _batch, _student

from rosita_fast import FastModulesConfig, first_token_output, swap_
from rosita_fast.distill import KDConfig, KDLoss
from rosita_fast.distill.teacher import teacher_forward
from rosita_fast.fast_modules import can_output_first_token, logits_context
from rosita_fast.modules import FastTransformerLayer, PrunedSelfAttention


def _fast(arch: str, kind: str, **overrides):
    model = (tiny_model(arch, "seq", **overrides) if kind == "stock"
             else _student(arch, **overrides))
    swap_(model, FastModulesConfig())
    return model.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _last(model) -> FastTransformerLayer:
    layers = [m for m in model.modules() if isinstance(m, FastTransformerLayer)]
    return layers[-1]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", ["stock", "student"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_gradients_match_every_position(arch, kind, train):
    model = _fast(arch, kind, **NO_DROPOUT).train(train)
    batch = _batch(arch=arch, batch=4, length=13)
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(**batch).logits
    g_full = torch.autograd.grad(full.square().sum(), params)
    with first_token_output(model):
        assert _last(model).first_token_only
        first = model(**batch).logits
        g_first = torch.autograd.grad(first.square().sum(), params)
    assert not _last(model).first_token_only
    assert _rel(first, full) < 1e-12
    scale = torch.stack([g.norm() for g in g_full]).norm()
    for a, b in zip(g_first, g_full, strict=True):
        assert (a - b).norm() <= 1e-10 * max(b.norm(), 1e-6 * scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_the_stock_model(arch):
    stock = tiny_model(arch, "seq").double().eval()
    fast = copy.deepcopy(stock)
    swap_(fast, FastModulesConfig())
    batch = _batch(arch=arch, batch=5, length=17)
    with torch.no_grad(), first_token_output(fast):
        out = fast(**batch)
    ref = stock(**batch).logits
    assert _rel(out.logits, ref) < 1e-12
    hidden = out.get("hidden_states")
    assert hidden is None  # nobody asked for them


def test_last_hidden_state_is_the_first_position_only():
    model = _fast("bert", "stock").eval()
    batch = _batch(batch=3, length=9)
    with torch.no_grad():
        full = model.bert(**batch).last_hidden_state
        with first_token_output(model):
            first = model.bert(**batch).last_hidden_state
    assert full.shape == (3, 9, model.config.hidden_size)
    assert first.shape == (3, 1, model.config.hidden_size)
    assert _rel(first[:, 0], full[:, 0]) < 1e-12


def test_training_with_dropout_keeps_the_first_position_path():
    model = _fast("bert", "student").train()  # the tiny config's dropout is on
    batch = _batch(batch=4, length=12)
    seen = []
    handle = _last(model).register_forward_hook(lambda m, a, out: seen.append(out.shape))
    with first_token_output(model):
        logits = model(**batch).logits
    handle.remove()
    logits.sum().backward()
    assert seen == [(4, 1, model.config.hidden_size)]
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


def test_flag_is_restored_after_an_exception():
    model = _fast("bert", "stock")
    with pytest.raises(RuntimeError, match="boom"), first_token_output(model):
        raise RuntimeError("boom")
    assert not _last(model).first_token_only


def test_refuses_models_it_cannot_serve():
    from transformers import BertForTokenClassification

    stock = tiny_model("bert", "seq")
    assert not can_output_first_token(stock)
    with pytest.raises(ValueError, match="not a fast layer"), first_token_output(stock):
        pass
    tokens = BertForTokenClassification(stock.config)
    swap_(tokens, FastModulesConfig())
    assert not can_output_first_token(tokens)
    with pytest.raises(TypeError, match="more than the first token"), first_token_output(tokens):
        pass
    # logits_context changes nothing where first_token_output does not apply.
    batch = _batch()
    with torch.no_grad(), logits_context(stock):
        a = stock.eval()(**batch).logits
    assert torch.equal(a, stock(**batch).logits)


@pytest.mark.parametrize("rows", [0, 12, 1.0])
def test_attention_query_rows_is_checked(rows):
    model = _fast("bert", "stock")
    block = next(m for m in model.modules() if isinstance(m, PrunedSelfAttention))
    x = torch.randn(2, 11, model.config.hidden_size, dtype=torch.float64)
    with pytest.raises(ValueError, match="query_rows"):
        block(x, None, None, rows)


def test_attention_query_rows_match_the_full_block():
    model = _fast("mpnet", "student").eval()
    block = next(m for m in model.modules() if isinstance(m, PrunedSelfAttention))
    # 70 positions: the keys cross the C++ kernel's 64-key block.
    x = torch.randn(3, 70, model.config.hidden_size, dtype=torch.float64)
    mask = torch.ones(3, 70, dtype=torch.bool)
    mask[1, 66:] = False
    heads = model.config.num_attention_heads
    bias = torch.randn(1, heads, 70, 70, dtype=torch.float64)
    with torch.no_grad():
        full = block(x, mask, bias)
        for rows in (1, 4):
            assert _rel(block(x, mask, bias, rows), full[:, :rows]) < 1e-12


def test_teacher_forward_and_evaluation_use_it():
    from rosita_fast.data import get_task
    from rosita_fast.train.evaluation import evaluate

    model = _fast("bert", "student").eval()
    batch = _batch(batch=4, length=10)
    shapes = []
    handle = _last(model).register_forward_hook(lambda m, a, out: shapes.append(out.shape[1]))
    logits_kd = KDLoss(KDConfig(prediction_weight=1.0, gold_weight=0.0))
    hidden_kd = KDLoss(KDConfig(prediction_weight=1.0, hidden_weight=1.0, gold_weight=0.0))
    a = teacher_forward(model, batch, logits_kd).logits
    b = teacher_forward(model, batch, hidden_kd).logits
    labelled = dict(batch, labels=torch.tensor([0, 1, 2, 0]))
    metrics = evaluate(model, [labelled], get_task("mnli"), torch.device("cpu"))
    handle.remove()
    assert shapes == [1, 10, 1]
    assert _rel(a, b) < 1e-12
    assert 0.0 <= metrics["acc"] <= 1.0
