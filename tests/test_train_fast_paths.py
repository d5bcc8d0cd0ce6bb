"""``train.fused_losses`` and ``train.fused_optimizer``: by default the trainer computes the
distillation terms with the fused ops and updates through the fused optimizer kernel; with both
off (the plain-PyTorch losses, the per-tensor optimizer loop) it trains to the same model."""

from __future__ import annotations

import pytest
import torch
from test_train_support import (
    TASK,
    collate,
    quick_config,
    single_thread,
    state_of,
    synthetic_data,
    tiny_bert,
)

from rosita_fast.distill import FUSED_FUNCTIONS, REFERENCE_FUNCTIONS, KDConfig
from rosita_fast.train import Trainer


def _trainer(out, **overrides) -> Trainer:
    kd = KDConfig(prediction_weight=1.0, hidden_weight=1.0, temperature=2.0)
    config = quick_config(kd=kd, epochs=1, teacher_cache=False, **overrides)
    return Trainer(config, model=tiny_bert(41, dropout=0.0), teacher=tiny_bert(2, dropout=0.0),
                   train_data=synthetic_data(32, 42), eval_data=synthetic_data(16, 43),
                   task=TASK, collate_fn=collate(), output_dir=out)


@pytest.mark.parametrize("optimizer", ["bert_adam", "adamw"])
def test_fused_and_plain_paths_train_to_the_same_model(tmp_path, optimizer):
    with single_thread():
        fused = _trainer(tmp_path / "fused", optimizer=optimizer)
        fused.run()
        plain = _trainer(tmp_path / "plain", optimizer=optimizer, fused_losses=False,
                         fused_optimizer=False)
        plain.run()
    assert fused.kd.fn is FUSED_FUNCTIONS and plain.kd.fn is REFERENCE_FUNCTIONS
    assert fused.optimizer.defaults["fused"] and not plain.optimizer.defaults["fused"]
    a, b = state_of(fused.model), state_of(plain.model)
    moved = state_of(tiny_bert(41, dropout=0.0))
    key = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(a[key], moved[key])  # training did change the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
