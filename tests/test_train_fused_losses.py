"""``train.fused_losses``: the trainer computes the distillation terms with the fused ops by
default and with the plain-PyTorch losses when it is off, training to the same model."""

from __future__ import annotations

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


def test_fused_and_reference_losses_train_to_the_same_model(tmp_path):
    with single_thread():
        fused = _trainer(tmp_path / "fused")
        fused.run()
        plain = _trainer(tmp_path / "plain", fused_losses=False)
        plain.run()
    assert fused.kd.fn is FUSED_FUNCTIONS and plain.kd.fn is REFERENCE_FUNCTIONS
    a, b = state_of(fused.model), state_of(plain.model)
    moved = state_of(tiny_bert(41, dropout=0.0))
    key = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(a[key], moved[key])  # training did change the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
