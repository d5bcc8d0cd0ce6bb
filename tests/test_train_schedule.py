"""LR re-anchoring at pruning events, selection only after pruning, and early stopping."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_support import collate, quick_trainer, single_thread, synthetic_data
from transformers import AutoModelForSequenceClassification

from rosita_fast.compress import count_parameters
from rosita_fast.data import get_task
from rosita_fast.train import LRSchedule, ModelSelection, PruningConfig, evaluate, read_eval_log
from rosita_fast.train.checkpoint import BEST_MODEL_DIR

WIDTH = PruningConfig(mode="width", heads=2, ffn=24, interval=2)  # events after updates 2 and 4


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


# ---- (e) learning rate ---------------------------------------------------------------------

def test_linear_schedule_warms_up_then_decays_to_zero():
    lr = LRSchedule("linear", total_steps=10, warmup_steps=4)
    factors = [lr.factor(t) for t in range(10)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_reanchoring_during_warmup_decays_from_the_current_value():
    lr = LRSchedule("linear", total_steps=10, warmup_steps=4)
    lr.reanchor(1)  # the update after 1 update had factor 0.5
    assert [lr.factor(t) for t in (1, 4, 9)] == pytest.approx([0.5, 0.5 * 6 / 9, 0.5 / 9])
    lr.reanchor(4)  # a second event continues from the re-anchored line
    assert [lr.factor(t) for t in (4, 7)] == pytest.approx([0.5 * 6 / 9, 0.5 * 6 / 9 * 3 / 6])


def test_reanchoring_after_warmup_continues_the_same_line():
    plain, anchored = (LRSchedule("linear", total_steps=20, warmup_steps=2) for _ in range(2))
    anchored.reanchor(7)
    assert [anchored.factor(t) for t in range(7, 20)] == pytest.approx(
        [plain.factor(t) for t in range(7, 20)])


def test_constant_schedule_returns_to_the_base_rate():
    lr = LRSchedule("none", total_steps=10)
    lr.reanchor(3)
    assert {lr.factor(t) for t in range(10)} == {1.0}


@pytest.mark.parametrize("schedule", ["linear", "none"])
def test_trainer_reanchors_the_lr_at_pruning_events(tmp_path, schedule):
    warmup = 0.25 if schedule == "linear" else 0.0  # 16 updates: 4 of warm-up
    trainer = quick_trainer(tmp_path / "run", epochs=4, eval_every=1, lr_schedule=schedule,
                            warmup_proportion=warmup, pruning=WIDTH)
    trainer.run()
    # The log after update s shows the LR that update s used (s = 1..16; update index s - 1).
    logged = [r["lr"] for r in read_eval_log(tmp_path / "run" / "eval_log.jsonl")]
    base = trainer.config.learning_rate
    if schedule == "none":
        assert logged == pytest.approx([base] * 16)
        return
    # Warm-up (1/4, 2/4) until the event after update 2, which re-anchors at factor 3/4 and
    # decays to 0 at update 16; the event after update 4 continues that line.
    expected = [0.25, 0.5] + [0.75 * (16 - t) / 14 for t in range(2, 16)]
    assert logged == pytest.approx([base * f for f in expected])


# ---- (f) selection only after pruning ------------------------------------------------------

def test_selection_ignores_metrics_from_before_the_end_of_pruning():
    sel = ModelSelection()
    during = [sel.observe(s, {"acc": 0.9}, "acc", pruning_done=False, pruning_end_step=0)
              for s in (1, 2)]
    assert [d.save for d in during] == [True, True]  # every evaluation replaces the model
    assert sel.best_metric is None
    after = [sel.observe(s, {"acc": v}, "acc", pruning_done=True, pruning_end_step=3)
             for s, v in ((4, 0.5), (5, 0.6), (6, 0.55), (7, 0.6))]
    assert [d.save for d in after] == [True, True, False, False]
    assert (sel.best_metric, sel.best_step, sel.saved_step) == (0.6, 5, 5)


def test_trainer_keeps_a_model_of_the_final_shape(tmp_path):
    out = tmp_path / "run"
    trainer = quick_trainer(out, epochs=3, eval_every=1, pruning=WIDTH)
    result = trainer.run()
    records = read_eval_log(out / "eval_log.jsonl")
    during = [r for r in records if not r["pruning_done"]]
    after = [r for r in records if r["pruning_done"]]
    assert [r["step"] for r in during] == [1, 2, 3, 4] and all(r["saved"] for r in during)
    best = max(r["acc"] for r in after)
    first_best = next(r["step"] for r in after if r["acc"] == best)
    assert (result.best_metric, result.best_step) == (best, first_best)
    assert [r["saved"] for r in after] == [
        r["acc"] > max([a["acc"] for a in after[:i]], default=-1) for i, r in enumerate(after)]

    config = json.loads((out / BEST_MODEL_DIR / "config.json").read_text())
    assert config["num_attention_heads_per_layer"] == [2, 2]
    saved = AutoModelForSequenceClassification.from_pretrained(out / BEST_MODEL_DIR)
    assert result.num_parameters == count_parameters(saved) == count_parameters(trainer.model)
    loader = torch.utils.data.DataLoader(synthetic_data(16, 43), batch_size=16,
                                         collate_fn=collate())
    assert evaluate(saved, loader, get_task("sst-2"), torch.device("cpu"))["acc"] == best


# ---- (g) early stopping ----------------------------------------------------------------------

def test_patience_counts_from_the_end_of_pruning_and_the_last_improvement():
    sel = ModelSelection(patience_steps=3)
    for step in range(1, 10):  # no improvement is possible during pruning: never stops there
        assert not sel.observe(step, {"acc": 0.1}, "acc", pruning_done=False,
                               pruning_end_step=0).stop
    values = {10: 0.5, 11: 0.5, 12: 0.6, 13: 0.6, 14: 0.6, 15: 0.6}
    stops = {s: sel.observe(s, {"acc": v}, "acc", pruning_done=True, pruning_end_step=10).stop
             for s, v in values.items()}
    assert stops == {10: False, 11: False, 12: False, 13: False, 14: False, 15: True}


def test_trainer_stops_early_when_the_metric_stalls(tmp_path):
    out = tmp_path / "run"
    # A vanishing learning rate: after pruning the metric cannot improve any more.
    result = quick_trainer(out, epochs=4, eval_every=1, learning_rate=1e-12, patience_steps=3,
                           pruning=WIDTH).run()
    # Pruning ends with the event before update 5; the first evaluation after it (update 5) is
    # the best, and 3 updates later patience runs out.
    assert result.stopped_early and result.steps == 8 and result.best_step == 5
    assert [r["step"] for r in read_eval_log(out / "eval_log.jsonl")][-1] == 8
    assert json.loads((out / "result.json").read_text())["stopped_early"] is True
