"""Pruning schedules: ROSITA's linear amounts and timing, driven from a training loop."""

from __future__ import annotations

import pytest
import torch
from conftest_compress import clone, random_batch, tiny_model
from transformers import BertConfig, BertModel

from rosita_fast.compress import (
    PruningSchedule,
    group_names,
    linear_sizes,
    prune_,
    rebuild_optimizer_,
    top_k,
)
from rosita_fast.models import adapter_for, model_layout


def _bert_base_shape(layers: int) -> BertModel:
    # BERT-base dimensions on the meta device: shapes and schedules without allocating weights.
    with torch.device("meta"):
        return BertModel(BertConfig(num_hidden_layers=layers))


def test_linear_sizes_follow_rosita():
    assert linear_sizes(3072, 512, 10) == [3072 - 256 * k for k in range(1, 11)]
    assert linear_sizes(768, 128, 10) == [768 - 64 * k for k in range(1, 11)]
    assert linear_sizes(12, 8, 4) == [11, 10, 9, 8]
    assert linear_sizes(10, 0, 4) == [7, 5, 2, 0]  # removed amounts 2.5 and 7.5 round up


def test_width_schedule_reproduces_the_rosita_trajectory():
    model = _bert_base_shape(8)
    schedule = PruningSchedule.width(
        model, heads=2, ffn=512, embedding_rank=128, total_steps=349_510, prune_fraction=0.01
    )
    assert len(schedule.events) == 10
    interval = 3495 // 10
    got = [(e.step, e.heads[0], e.ffn[0], e.embedding_rank) for e in schedule.events]
    want = [((k + 1) * interval, 11 - k, 2816 - 256 * k, 704 - 64 * k) for k in range(10)]
    assert got == want
    assert all(e.heads == [e.heads[0]] * 8 and e.layers is None for e in schedule.events)


def test_depth_schedule_drops_one_top_layer_per_event():
    schedule = PruningSchedule.depth(
        _bert_base_shape(12), layers=8, total_steps=1000, prune_fraction=0.2
    )
    assert [(e.step, e.layers) for e in schedule.events] == [
        (50, 11),
        (100, 10),
        (150, 9),
        (200, 8),
    ]
    assert schedule.tracker is None  # depth needs no importance


def test_impossible_schedules_fail_at_construction():
    model = tiny_model("bert", "seq")
    with pytest.raises(ValueError, match="less than one step"):
        PruningSchedule.width(model, heads=2, total_steps=10, prune_fraction=0.1)
    with pytest.raises(ValueError, match="num_events is required"):
        PruningSchedule.width(model, ffn=16, total_steps=100, prune_fraction=0.5)
    with pytest.raises(ValueError, match="do not fit"):
        PruningSchedule.width(model, heads=5, num_events=1, interval=3)
    with pytest.raises(ValueError, match="needs gradients from earlier steps"):
        PruningSchedule.one_step(model, at_step=0, heads=2)
    with pytest.raises(ValueError, match="layers must be in 1..2"):
        PruningSchedule.depth(model, layers=3, interval=2)


def _optimizer(model):
    decay = [
        p for n, p in model.named_parameters() if not n.endswith("bias") and "LayerNorm" not in n
    ]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
    )


@pytest.mark.parametrize("selection", ["layer", "global"])
def test_width_schedule_inside_a_training_loop(selection, seed):
    model = tiny_model("mpnet", "seq").train()
    adapter = adapter_for(model)
    optimizer = _optimizer(model)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 100)
    schedule = PruningSchedule.width(
        model, heads=2, ffn=16, embedding_rank=8, interval=3, selection=selection
    )
    assert [e.heads for e in schedule.events] == [[3] * 3, [2] * 3]
    assert [e.ffn for e in schedule.events] == [[32] * 3, [16] * 3]
    assert [e.embedding_rank for e in schedule.events] == [20, 8]

    fired_at = []
    for step in range(8):
        if step in (3, 6):
            expected_scores = schedule.tracker.scores()
            before = clone(model)
        fired = schedule.step(model, optimizer)
        if fired:
            fired_at.append(step)
            assert not optimizer.state  # Adam moments reset, as ROSITA does
            names = {id(p): n for n, p in model.named_parameters()}
            in_groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
            assert sorted(sum(in_groups, [])) == sorted(names.values())
            assert all("bias" in n or "LayerNorm" in n for n in in_groups[1])
            assert "mpnet.embeddings.word_embeddings.lookup.weight" in in_groups[0]
            if selection == "layer":
                want = 3 if step == 3 else 2
                for i, (old, new) in enumerate(
                    zip(adapter.layer_list(before), adapter.layer_list(model), strict=True)
                ):
                    kept = top_k(expected_scores.heads[i], want)
                    rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in kept])
                    q_old = adapter.attention_linears(old)[0].weight
                    assert torch.equal(adapter.attention_linears(new)[0].weight, q_old[rows])
        loss = model(**random_batch(model), labels=torch.tensor([0, 1, 2])).loss
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
    assert fired_at == [3, 6] and schedule.done and schedule.tracker is None
    layout = model_layout(model)
    assert sum(layout.heads) == 6 and sum(layout.intermediate_sizes) == 48
    assert layout.embedding_rank == 8
    if selection == "layer":
        assert layout.heads == [2, 2, 2] and layout.intermediate_sizes == [16, 16, 16]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 8 / 100))


def test_depth_then_state_round_trip(seed):
    model = tiny_model("bert", "seq", num_hidden_layers=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = PruningSchedule.depth(model, layers=2, interval=2)
    for _ in range(3):
        schedule.step(model, optimizer)
    assert model.config.num_hidden_layers == 3
    state = schedule.state_dict()
    resumed = PruningSchedule(model, [])
    resumed.load_state_dict(state)
    assert resumed.steps_done == 3 and resumed.next_event == 1
    fired = [resumed.step(model, optimizer) for _ in range(2)]
    assert fired == [False, True] and model.config.num_hidden_layers == 2
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))


def _step_with_loss(model, schedule, optimizer, batch):
    schedule.step(model, optimizer)
    model(**batch, labels=torch.tensor([0, 1, 2])).loss.backward()
    if schedule.importance_source == "grads":
        schedule.accumulate_from_grads()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("source", ["hooks", "grads"])
def test_resume_between_events_prunes_on_the_same_scores(source, seed, tmp_path):
    model = tiny_model("bert", "seq")  # eval mode: no dropout, runs are repeatable
    resumed_model = clone(model)
    batches = [random_batch(model) for _ in range(5)]
    options = dict(interval=3, selection="global", importance_source=source)
    schedule = PruningSchedule.width(model, heads=2, ffn=16, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in batches[:2]:  # importance gathered towards the event after update 3
        _step_with_loss(model, schedule, optimizer, batch)
    torch.save(schedule.state_dict(), tmp_path / "schedule.pt")
    state = torch.load(tmp_path / "schedule.pt", weights_only=True)

    # The resumed copy: weights as the checkpoint holds them, schedule from its state alone.
    resumed_model.load_state_dict(model.state_dict())
    resumed = PruningSchedule.from_state_dict(resumed_model, state)
    assert (resumed.selection, resumed.importance_source) == ("global", source)
    assert (resumed.steps_done, resumed.next_event, resumed.events) == (
        2, 0, schedule.events)
    assert resumed.tracker.num_batches == 2
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.05)
    for batch in batches[2:]:  # through the event and one update past it
        _step_with_loss(model, schedule, optimizer, batch)
        _step_with_loss(resumed_model, resumed, resumed_optimizer, batch)
    assert model_layout(model).heads == model_layout(resumed_model).heads
    for (name, value), resumed_value in zip(
        model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(value, resumed_value), name


def test_restoring_a_state_that_does_not_fit_is_rejected(seed):
    model = tiny_model("bert", "seq")
    schedule = PruningSchedule.width(model, heads=2, interval=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    _step_with_loss(model, schedule, optimizer, random_batch(model))
    state = schedule.state_dict()
    with pytest.raises(ValueError, match="method 'taylor'"):
        PruningSchedule.from_state_dict(clone(model), state, method="mask")
    with pytest.raises(ValueError, match="unknown schedule options"):
        PruningSchedule.from_state_dict(clone(model), state, interval=3)
    # A model already at the target cannot take the remaining events.
    small = clone(model)
    prune_(small, heads=[[0, 1]] * 3)
    with pytest.raises(ValueError, match="do not fit"):
        PruningSchedule.from_state_dict(small, state)
    with pytest.raises(RuntimeError, match="importance_source='grads'"):
        schedule.accumulate_from_grads()
    schedule.tracker.detach()


def test_optimizer_can_keep_the_state_of_unpruned_parameters(seed):
    model = tiny_model("bert", "seq")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(**random_batch(model), labels=torch.tensor([0, 1, 2])).loss.backward()
    optimizer.step()
    names = group_names(optimizer, model)
    layer_norm = model.bert.encoder.layer[0].output.LayerNorm.weight
    prune_(model, ffn=[list(range(10))] * 3)
    rebuild_optimizer_(optimizer, model, names, state="keep_unpruned")
    assert layer_norm in optimizer.state  # untouched parameter: moments kept
    assert set(optimizer.state) <= set(model.parameters())
    ffn_in = model.bert.encoder.layer[0].intermediate.dense.weight
    assert ffn_in not in optimizer.state and any(
        p is ffn_in for p in optimizer.param_groups[0]["params"]
    )
