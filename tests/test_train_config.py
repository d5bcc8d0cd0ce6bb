"""Options: unknown or ill-typed keys, inconsistent settings, and the BertAdam update rule."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_support import (
    collate,
    quick_config,
    quick_trainer,
    single_thread,
    synthetic_data,
    tiny_bert,
)

from rosita_fast.distill import KDConfig
from rosita_fast.train import BertAdam, PruningConfig, TrainConfig, TrainConfigError, Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_round_trip_through_json():
    config = TrainConfig(kd=KDConfig(hidden_weight=1.0), eval_every=7,
                         pruning=PruningConfig(mode="width", heads=[2, 3], ffn=16,
                                               prune_fraction=0.1))
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize("values, match", [
    ({"batchsize": 32}, "unknown train option.*batchsize"),
    ({"kd": {"hidden_wieght": 1.0}}, "unknown distillation option.*hidden_wieght"),
    ({"pruning": {"mode": "width", "head": 2, "interval": 3}}, "unknown pruning option.*head"),
    ({"pruning": {"heads": 2, "interval": 3}}, "pruning.mode is required"),
    ({"batch_size": "32"}, "train.batch_size must be int"),
    ({"batch_size": 32.0}, "train.batch_size must be int"),
    ({"progress": 1}, "train.progress must be bool"),
    ({"learning_rate": "2e-5"}, "train.learning_rate must be float"),
    ({"lr_schedule": "cosine"}, "train.lr_schedule must be 'none' or 'linear'"),
    ({"pruning": {"mode": "width", "heads": "2", "interval": 3}}, "pruning.heads must be"),
    ({"pruning": {"mode": "width", "heads": [2, True], "interval": 3}}, "pruning.heads"),
    ({"kd": {"hidden_weight": "1"}}, "hidden_weight must be a number"),
    ({"pruning": "width"}, "pruning must be PruningConfig"),
])
def test_unknown_and_ill_typed_options_are_named(values, match):
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize("values, match", [
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"warmup_proportion": 0.1, "lr_schedule": "none"}, "warmup_proportion needs"),
    ({"warmup_proportion": 1.0}, "warmup_proportion must be in"),
    ({"learning_rate": 0}, "learning_rate must be > 0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be > 0"),
    ({"pruning": {"mode": "width", "heads": 2}}, "exactly one of prune_fraction or interval"),
    ({"pruning": {"mode": "width", "heads": 2, "interval": 2, "prune_fraction": 0.1}},
     "exactly one"),
    ({"pruning": {"mode": "width", "layers": 2, "heads": 2, "interval": 2}}, "depth stage"),
    ({"pruning": {"mode": "depth", "interval": 2}}, "needs a target 'layers'"),
    ({"pruning": {"mode": "depth", "layers": 2, "ffn": 8, "interval": 2}}, "only removes layers"),
    ({"pruning": {"mode": "one_step", "heads": 2}}, "needs 'at_step'"),
    ({"pruning": {"mode": "width", "heads": 0, "interval": 2}}, "at least 1"),
])
def test_inconsistent_options_are_rejected(values, match):
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig.from_dict(values)


def test_ints_are_accepted_for_float_options():
    config = TrainConfig.from_dict({"learning_rate": 1, "weight_decay": 0})
    assert isinstance(config.learning_rate, float) and config.learning_rate == 1.0


@pytest.mark.parametrize("overrides, match", [
    ({"kd": KDConfig()}, "needs a teacher"),
    ({"batch_size": 64}, "fewer than one batch"),
    ({"metric": "mcc"}, "metric 'mcc' is not reported"),
    ({"pruning": PruningConfig(mode="width", heads=2, interval=5)}, "last event fires after 10"),
    ({"pruning": PruningConfig(mode="depth", layers=5, interval=1)}, "layers must be in"),
    ({"pruning": PruningConfig(mode="width", heads=[2, 2, 2], interval=1)}, "3 per-layer"),
])
def test_problems_are_reported_before_training(tmp_path, overrides, match):
    out = tmp_path / "run"
    with pytest.raises(TrainConfigError, match=match):
        quick_trainer(out, **overrides)
    assert not out.exists()  # nothing was written


def test_a_teacher_sharing_the_students_tensors_is_rejected(tmp_path):
    student = tiny_bert(41)
    with pytest.raises(TrainConfigError, match="separate copy"):
        Trainer(quick_config(kd=KDConfig()), model=student, teacher=student,
                train_data=synthetic_data(32, 1), collate_fn=collate(), output_dir=tmp_path)


@pytest.mark.parametrize("teacher_options, kd, match", [
    ({"num_labels": 3}, KDConfig(), "student has 2 labels, teacher 3"),
    ({"hidden": 48}, KDConfig(hidden_weight=1.0), "equal widths"),
    ({"layers": 3}, KDConfig(hidden_weight=1.0, layer_map=[0, 1, 2, 3]), "kd.layer_map"),
])
def test_a_teacher_that_does_not_fit_is_rejected(tmp_path, teacher_options, kd, match):
    with pytest.raises(TrainConfigError, match=match):
        quick_trainer(tmp_path / "run", teacher=tiny_bert(3, **teacher_options), kd=kd)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fused", [False, True])
def test_bert_adam_has_no_bias_correction_and_clips_each_tensor(fused):
    a = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    b = torch.nn.Parameter(torch.tensor([0.5]))
    lr, eps, wd, b1, b2 = 0.1, 1e-6, 0.01, 0.9, 0.999
    opt = BertAdam([{"params": [a], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
                   lr=lr, eps=eps, max_grad_norm=1.0, fused=fused)
    a.grad = torch.tensor([30.0, 40.0])  # norm 50: clipped to norm 1 on its own
    b.grad = torch.tensor([0.2])  # below the norm: untouched (a global clip would shrink it)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.step()
    ga = torch.tensor([0.6, 0.8]) * (1.0 / (1.0 + 1e-6 / 50))
    m, v = (1 - b1) * ga, (1 - b2) * ga**2
    expected_a = a0 - lr * (m / (v.sqrt() + eps) + wd * a0)
    gb = torch.tensor([0.2])
    expected_b = b0 - lr * ((1 - b1) * gb / (((1 - b2) * gb**2).sqrt() + eps))
    torch.testing.assert_close(a.detach(), expected_a)
    torch.testing.assert_close(b.detach(), expected_b)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_fused_bert_adam_follows_the_loop_over_many_steps(max_grad_norm):
    # Odd sizes, two groups, gradients alternating between clipped and unclipped, one parameter
    # without a gradient on some steps: the fused kernel stays within float rounding of the loop.
    shapes = [(37, 19), (5,), (64, 33), (3, 1)]
    loop = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    fused = [torch.nn.Parameter(p.detach().clone()) for p in loop]
    start = [p.detach().clone() for p in loop]

    def make(params, flag):
        return BertAdam([{"params": params[:2], "weight_decay": 0.01},
                         {"params": params[2:], "weight_decay": 0.0}],
                        lr=1e-2, max_grad_norm=max_grad_norm, fused=flag)

    opt_loop, opt_fused = make(loop, False), make(fused, True)
    for step in range(25):
        for i, (x, y) in enumerate(zip(loop, fused, strict=True)):
            if i == 3 and step % 3 == 0:
                x.grad = y.grad = None
                continue
            g = torch.randn_like(x) * (3.0 if step % 2 else 0.01)
            x.grad, y.grad = g.clone(), g.clone()
        opt_loop.step()
        opt_fused.step()
    for x, y, x0 in zip(loop, fused, start, strict=True):
        assert (x.detach() - x0).abs().max() > 1e-2  # the parameters did move
        torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-5, atol=1e-5)
    assert opt_fused.state[fused[3]]["step"] == opt_loop.state[loop[3]]["step"] == 16
    # Like the loop's in-place ops, the fused step bumps the version counters, which caches of
    # derived weights (the fast modules') check.
    versions = [p._version for p in fused]
    for p in fused:
        p.grad = torch.randn_like(p)
    opt_fused.step()
    assert all(p._version > v for p, v in zip(fused, versions, strict=True))


def test_fused_bert_adam_needs_floating_point_parameters():
    with pytest.raises(RuntimeError, match="fused=True"):
        BertAdam([torch.nn.Parameter(torch.ones(2, dtype=torch.int32), requires_grad=False)],
                 lr=0.1, fused=True)
