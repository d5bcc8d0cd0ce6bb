"""The trainer's cache of teacher outputs: later epochs skip the teacher's forward and train to the
same model; a changed teacher or changed data never reuses an entry; teacher dropout or losses
that need padding positions turn it off; hidden states are served within their budget."""

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

from rosita_fast.distill import KDConfig
from rosita_fast.distill.teacher_cache import TeacherCache, fingerprint
from rosita_fast.train import Trainer


def _trainer(out, *, cache=None, teacher_seed=2, data_seed=42, **overrides) -> Trainer:
    overrides.setdefault("kd", KDConfig(prediction_weight=1.0))
    overrides.setdefault("epochs", 3)
    config = quick_config(**overrides)
    teacher = tiny_bert(teacher_seed, dropout=0.0)
    return Trainer(config, model=tiny_bert(41, dropout=0.0), teacher=teacher,
                   train_data=synthetic_data(32, data_seed), eval_data=synthetic_data(16, 43),
                   task=TASK, collate_fn=collate(), output_dir=out, teacher_cache=cache)


class _CountingTeacher(torch.nn.Module):
    """Counts the teacher's forward calls."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.calls = 0
        inner = trainer.teacher
        original = inner.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        inner.forward = counted


def test_later_epochs_skip_the_teacher_and_train_to_the_same_model(tmp_path):
    with single_thread():
        cached = _trainer(tmp_path / "a")
        counter = _CountingTeacher(cached)
        cached.run()
        plain = _trainer(tmp_path / "b", teacher_cache=False)
        plain_counter = _CountingTeacher(plain)
        plain.run()
    # 3 epochs of 4 batches: the first epoch runs the teacher, the others read the cache
    assert plain_counter.calls == 12
    assert counter.calls == 4
    assert cached.teacher_cache.hits == 8 and len(cached.teacher_cache) == 32
    a, b = state_of(cached.model), state_of(plain.model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_changed_teacher_or_data_never_reuses_entries(tmp_path):
    cache = TeacherCache()
    with single_thread():
        first = _trainer(tmp_path / "a", cache=cache, epochs=1)
        first.run()
        key = cache.key
        assert len(cache) == 32
        same = _trainer(tmp_path / "b", cache=cache, epochs=1)  # same teacher and data
        counter = _CountingTeacher(same)
        same.run()
        assert cache.key == key and counter.calls == 0  # a later stage reuses every entry
        other = _trainer(tmp_path / "c", cache=cache, epochs=1, teacher_seed=3)
        counter = _CountingTeacher(other)
        other.run()
        assert cache.key != key and counter.calls == 4
        key2 = cache.key
        data = _trainer(tmp_path / "d", cache=cache, epochs=1, teacher_seed=3, data_seed=44)
        counter = _CountingTeacher(data)
        data.run()
        assert cache.key != key2 and counter.calls == 4


def test_fingerprint_sees_one_changed_parameter():
    teacher = tiny_bert(2)
    data = synthetic_data(8, 1)
    before = fingerprint(teacher, data)
    with torch.no_grad():
        teacher.bert.encoder.layer[1].output.dense.weight[3, 5] += 1e-6
    assert fingerprint(teacher, data) != before
    data.items[3]["input_ids"][1] += 1
    assert fingerprint(tiny_bert(2), data) != fingerprint(tiny_bert(2), synthetic_data(8, 1))


def test_off_where_outputs_are_not_deterministic(tmp_path):
    assert _trainer(tmp_path / "a", kd=KDConfig(prediction_weight=1.0,
                                                teacher_dropout=True)).teacher_cache is None
    assert _trainer(tmp_path / "b", kd=KDConfig(hidden_weight=1.0, prediction_weight=1.0,
                                                hidden_include_padding=True)
                    ).teacher_cache is None
    assert _trainer(tmp_path / "c", teacher_cache=False).teacher_cache is None


def test_hidden_states_within_the_budget(tmp_path):
    kd = KDConfig(hidden_weight=1.0, prediction_weight=1.0)
    with single_thread():
        small = _trainer(tmp_path / "a", kd=kd, teacher_cache_hidden_mb=0)
        small_counter = _CountingTeacher(small)
        small.run()
        big = _trainer(tmp_path / "b", kd=kd, teacher_cache_hidden_mb=16)
        big_counter = _CountingTeacher(big)
        big.run()
        plain = _trainer(tmp_path / "c", kd=kd, teacher_cache=False)
        plain.run()
    assert small_counter.calls == 12  # logits alone do not serve a hidden-state loss
    assert big_counter.calls == 4
    a, b = state_of(big.model), state_of(plain.model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_cache_serves_padded_batches_from_unpadded_entries():
    cache = TeacherCache(hidden_budget_bytes=1 << 20)
    cache.bind("k")
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    logits = torch.randn(2, 3)
    hidden = (torch.randn(2, 4, 5), torch.randn(2, 4, 5))
    cache.put([7, 9], {"logits": logits, "hidden_states": hidden}, mask)
    assert cache.get([7, 9, 1], torch.ones(3, 2, dtype=torch.long), True) is None
    wider = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    out = cache.get([9, 7], wider, True)
    assert torch.equal(out["logits"], logits[[1, 0]])
    for got, want in zip(out["hidden_states"], hidden, strict=True):
        assert got.shape == (2, 6, 5)
        assert torch.equal(got[0, :2], want[1, :2]) and torch.equal(got[1, :3], want[0, :3])
        assert torch.all(got[0, 2:] == 0) and torch.all(got[1, 3:] == 0)
    cache.bind("other")
    assert len(cache) == 0 and cache.get([7], mask[:1], False) is None
