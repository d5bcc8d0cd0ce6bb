"""The weight average that stages evaluate and save (``train.weight_average_decay``).

The unit part checks :class:`WeightAverage` against the recursion written out in float64 on fresh
random tensors. The trainer part records the raw weights after every update of the resume
scenario (width pruning after updates 4 and 8, dropout, evaluation every 5 updates) and checks
that the saved model is the average, restarted at each pruning event, of those weights; that
averaging leaves the training trajectory bit-identical; and that a resumed run ends where an
uninterrupted one does.
"""

from __future__ import annotations

import pytest
import torch
from test_train_support import resume_trainer, single_thread, state_of
from torch import nn
from transformers import AutoModelForSequenceClassification

from rosita_fast.train import CheckpointError, TrainConfig, TrainConfigError, Trainer, read_eval_log
from rosita_fast.train.averaging import WeightAverage
from rosita_fast.train.checkpoint import BEST_MODEL_DIR

DECAY = 0.7  # short enough that 15 updates leave the average far from the raw weights


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _warmed(decay: float, t: int) -> float:
    return min(decay, (1 + t) / (10 + t))


# ---- WeightAverage ---------------------------------------------------------------------------

def _net() -> nn.Module:
    net = nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.Linear(13, 3))
    net.register_buffer("steps", torch.zeros((), dtype=torch.long))  # not a parameter: ignored
    return net


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_the_average_follows_the_recursion_in_float64(decay):
    net = _net()
    average = WeightAverage(net, decay)
    ref = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    steps = int(torch.randint(5, 40, ()))
    for t in range(1, steps + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        assert average.current_decay() == _warmed(decay, t)
        average.update(net)
        d = _warmed(decay, t)
        for n, p in net.named_parameters():
            ref[n] = d * ref[n] + (1 - d) * p.detach().double()
    assert average.updates == steps
    shadow = average.state_dict()["shadow"]
    assert sorted(shadow) == sorted(ref)
    for n, value in shadow.items():
        assert _rel(value, ref[n]) < 1e-6, n


def test_applied_swaps_the_average_in_and_restores_the_weights_exactly():
    net = _net()
    average = WeightAverage(net, 0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.5).add_(torch.randn_like(p))
        average.update(net)
    raw = state_of(net)
    shadow = average.state_dict()["shadow"]
    with pytest.raises(KeyError), average.applied(net):
        for n, p in net.named_parameters():
            assert torch.equal(p, shadow[n]) and not torch.equal(p, raw[n])
        raise KeyError("the block fails: the raw weights must still come back")
    for n, value in state_of(net).items():
        assert torch.equal(value, raw[n]), n


def test_replaced_parameters_need_a_reset():
    net = _net()
    average = WeightAverage(net, 0.9)
    net[2] = nn.Linear(13, 2)  # what a pruning event does to a layer
    with pytest.raises(RuntimeError, match="call reset"):
        average.update(net)
    with pytest.raises(RuntimeError, match="call reset"), average.applied(net):
        pass
    average.reset(net)
    average.update(net)
    assert average.updates == 1
    assert average.state_dict()["shadow"]["2.weight"].shape == (2, 13)


def test_state_round_trip_and_mismatches():
    net = _net()
    average = WeightAverage(net, 0.9)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    average.update(net)
    state = average.state_dict()
    other = WeightAverage(_net(), 0.9)
    copy = _net()
    copy.load_state_dict(net.state_dict())
    other.load_state_dict(state, copy)
    assert other.updates == 1
    for n, value in other.state_dict()["shadow"].items():
        assert torch.equal(value, state["shadow"][n])
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_net(), 0.8).load_state_dict(state, copy)
    pruned = _net()
    pruned[2] = nn.Linear(13, 2)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(state, pruned)
    pruned.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="other parameters"):
        other.load_state_dict(state, pruned)


@pytest.mark.parametrize("decay", [0, 1, -0.5, 1.5])
def test_the_decay_must_lie_strictly_between_0_and_1(decay):
    with pytest.raises(TrainConfigError, match="weight_average_decay must be in"):
        TrainConfig.from_dict({"weight_average_decay": decay})
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(_net(), decay)


# ---- in the trainer --------------------------------------------------------------------------

class _Recording(Trainer):
    """Records the parameters after every pruning check (before the update) and after every
    update, with the parameters' identities (a pruning event replaces them)."""

    def _train_step(self, batch):
        named = [(n, p) for n, p in self.model.named_parameters() if p.is_floating_point()]
        self.trace.append(("before", self.steps_done, [id(p) for _, p in named],
                           {n: p.detach().double().clone() for n, p in named}))
        loss = super()._train_step(batch)
        self.trace.append(("after", self.steps_done + 1, None,
                           {n: p.detach().double().clone() for n, p in named}))
        return loss


def _recording_trainer(out, **overrides) -> _Recording:
    _Recording.trace = []
    return resume_trainer(out, cls=_Recording, **overrides)


def _reference_averages(trace, decay: float) -> dict[int, dict[str, torch.Tensor]]:
    """The float64 average after every update, restarted where the parameters were replaced."""
    averages, shadow, ids, t = {}, None, None, 0
    for kind, step, step_ids, values in trace:
        if kind == "before":
            if step_ids != ids:
                shadow, ids, t = dict(values), step_ids, 0
            continue
        t += 1
        d = _warmed(decay, t)
        shadow = {n: d * shadow[n] + (1 - d) * values[n] for n in shadow}
        averages[step] = shadow
    return averages


@pytest.mark.parametrize("fast_modules", [False, True])
def test_the_saved_model_is_the_average_restarted_at_each_pruning_event(tmp_path, fast_modules):
    trainer = _recording_trainer(tmp_path, weight_average_decay=DECAY, fast_modules=fast_modules)
    result = trainer.run()
    averages = _reference_averages(trainer.trace, DECAY)
    assert len({tuple(i) for k, _, i, _ in trainer.trace if k == "before"}) == 3  # 2 events
    assert sorted(averages) == list(range(1, 16))
    log = read_eval_log(tmp_path / "eval_log.jsonl")
    assert [r["step"] for r in log] == [5, 10, 15]
    assert all(r["weights"] == "average" for r in log)
    assert result.best_step in (10, 15)

    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / BEST_MODEL_DIR)
    expected = averages[result.best_step]
    saved_params = dict(saved.named_parameters())
    assert sorted(saved_params) == sorted(expected)
    for n, value in saved_params.items():
        assert _rel(value.detach(), expected[n]) < 1e-6, n
    # The average is far from the raw weights of the same step: the test can tell them apart.
    raw = next(v for k, s, _, v in trainer.trace if k == "after" and s == result.best_step)
    assert max(_rel(saved_params[n].detach(), raw[n]) for n in raw) > 1e-3


@pytest.mark.parametrize("fast_modules", [False, True])
def test_averaging_does_not_change_the_training_trajectory(tmp_path, fast_modules):
    plain = resume_trainer(tmp_path / "plain", fast_modules=fast_modules)
    plain.run()
    averaged = resume_trainer(tmp_path / "averaged", fast_modules=fast_modules,
                              weight_average_decay=DECAY)
    averaged.run()
    for n, value in state_of(averaged.model).items():
        assert torch.equal(value, state_of(plain.model)[n]), n
    # ... while what is evaluated and saved differs.
    assert [r["weights"] for r in read_eval_log(tmp_path / "plain" / "eval_log.jsonl")] == [
        "raw"] * 3
    saved = {name: state_of(AutoModelForSequenceClassification.from_pretrained(
        tmp_path / name / BEST_MODEL_DIR)) for name in ("plain", "averaged")}
    assert any(not torch.equal(v, saved["plain"][n]) for n, v in saved["averaged"].items()
               if v.is_floating_point())


class _Interrupted(Trainer):
    STOP_AT = 7

    def _after_step(self) -> None:
        if self.steps_done == self.STOP_AT:
            raise KeyboardInterrupt


def test_a_resumed_run_ends_in_the_same_average(tmp_path):
    reference = resume_trainer(tmp_path / "reference", weight_average_decay=DECAY)
    expected = reference.run()
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        resume_trainer(out, cls=_Interrupted, weight_average_decay=DECAY).run()
    resumed = resume_trainer(out, resume=True, weight_average_decay=DECAY)
    assert resumed.steps_done == 6 and resumed.average.updates == 6 - 4  # restarted at event 4
    result = resumed.run()
    assert (result.best_step, result.best_metric) == (expected.best_step, expected.best_metric)
    assert read_eval_log(out / "eval_log.jsonl") == read_eval_log(
        tmp_path / "reference" / "eval_log.jsonl")
    for n, value in resumed.average.state_dict()["shadow"].items():
        assert torch.equal(value, reference.average.state_dict()["shadow"][n]), n
    for name in ("reference", "interrupted"):
        model = AutoModelForSequenceClassification.from_pretrained(
            tmp_path / name / BEST_MODEL_DIR)
        if name == "reference":
            ref_state = state_of(model)
        else:
            for n, value in state_of(model).items():
                assert torch.equal(value, ref_state[n]), n


def test_resuming_with_another_decay_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        resume_trainer(tmp_path, cls=_Interrupted, weight_average_decay=DECAY).run()
    with pytest.raises(CheckpointError, match="weight_average_decay"):
        resume_trainer(tmp_path, resume=True, weight_average_decay=0.5)
    with pytest.raises(CheckpointError, match="weight_average_decay"):
        resume_trainer(tmp_path, resume=True)
