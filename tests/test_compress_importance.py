"""Importance: Taylor |w|*mean|g| and mask-gradient scores, selection rules, no side effects."""

from __future__ import annotations

import pytest
import torch
from conftest_compress import ARCHS, clone, random_batch, tiny_model

from rosita_fast.compress import (
    ImportanceScores,
    ImportanceTracker,
    compress,
    compute_importance,
    prune_,
    select_global,
    top_k,
)
from rosita_fast.models import adapter_for, model_layout


def _labelled_batches(model, n=3):
    batches = []
    for _ in range(n):
        batch = random_batch(model)
        batch["labels"] = torch.randint(0, model.config.num_labels, (batch["input_ids"].shape[0],))
        batches.append(batch)
    return batches


@pytest.mark.parametrize("arch", ARCHS)
def test_taylor_scores_match_a_direct_gradient_computation(arch, seed):
    model = tiny_model(arch, "seq").train()  # dropout on, as ROSITA scores
    model.config.hidden_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # deterministic, so the reference pass sees the same gradients
    adapter = adapter_for(model)
    batches = _labelled_batches(model)
    layers = list(adapter.layer_list(model))
    weights = []
    for layer in layers:
        o = adapter.attention_linears(layer)[3]
        ffn_in, ffn_out = adapter.ffn_linears(layer)
        weights += [o.weight, ffn_in.weight, ffn_out.weight]
    sums = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, weights)
        for s, g in zip(sums, grads, strict=True):
            s += g.abs()

    scores = compute_importance(model, batches)
    assert scores.num_batches == len(batches) and scores.method == "taylor"
    n = len(batches)
    for i in range(len(layers)):
        s_o, s_in, s_out = (
            w.detach().abs() * s / n
            for w, s in zip(weights[3 * i : 3 * i + 3], sums[3 * i : 3 * i + 3], strict=True)
        )
        heads = s_o.sum(0).view(4, 8).sum(1)
        ffn = s_in.sum(1) + s_out.sum(0)
        torch.testing.assert_close(scores.heads[i], heads, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(scores.ffn[i], ffn, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_mask_scores_equal_the_mean_mask_gradient(arch, seed):
    model = tiny_model(arch, "seq")
    adapter = adapter_for(model)
    batches = _labelled_batches(model, 2)
    layers = list(adapter.layer_list(model))

    # Reference: d loss / d mask at mask = 1 is sum over tokens of (input * d loss / d input).
    captured = []

    def capture(module, args):
        x = args[0]
        x.retain_grad()
        captured.append(x)

    handles = []
    for layer in layers:
        handles.append(adapter.attention_linears(layer)[3].register_forward_pre_hook(capture))
        handles.append(adapter.ffn_linears(layer)[1].register_forward_pre_hook(capture))
    head_g = [torch.zeros(4) for _ in layers]
    ffn_g = [torch.zeros(48) for _ in layers]
    for batch in batches:
        captured.clear()
        model(**batch).loss.backward()
        for i in range(len(layers)):
            ctx, act = captured[2 * i], captured[2 * i + 1]
            head_g[i] += (ctx * ctx.grad).sum((0, 1)).view(4, 8).sum(1)
            ffn_g[i] += (act * act.grad).sum((0, 1))
    for h in handles:
        h.remove()
    model.zero_grad()

    scores = compute_importance(model, batches, method="mask")
    for i in range(len(layers)):
        torch.testing.assert_close(scores.heads[i], (head_g[i] / 2).abs(), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(scores.ffn[i], (ffn_g[i] / 2).abs(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method", ["taylor", "mask"])
def test_scoring_never_changes_weights_outputs_or_mode(method, seed):
    model = tiny_model("bert", "seq")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _labelled_batches(model)
    compute_importance(model, batches, method=method)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # Hooks are gone: outputs equal a clean copy's.
    model.eval()
    batch = random_batch(model)
    reference = clone(model)
    assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_tracker_accumulates_inside_a_training_loop_with_any_loss(seed):
    model = tiny_model("roberta", "seq")
    tracker = ImportanceTracker(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        out = model(**random_batch(model))
        loss = out.logits.pow(2).mean()  # any loss, e.g. a distillation loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert tracker.num_batches == 3
    first = tracker.scores()
    assert all(h.shape == (4,) and torch.all(h > 0) for h in first.heads)
    tracker.reset()
    assert tracker.num_batches == 0
    with pytest.raises(RuntimeError, match="no gradients"):
        tracker.scores()
    tracker.detach()


def _train_steps(model, trackers, steps, lr=0.05):
    """SGD steps on a labelled random batch; ``source="grads"`` trackers accumulate from .grad
    after backward and before the update, as a training loop (or DDP) would."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = random_batch(model)
        labels = torch.randint(0, model.config.num_labels, (batch["input_ids"].shape[0],))
        model(**batch, labels=labels).loss.backward()
        for tracker in trackers:
            if tracker.source == "grads":
                tracker.accumulate_from_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _assert_same_scores(got, want, method):
    assert (got.num_batches, got.method) == (want.num_batches, want.method)
    for part in ("heads", "ffn"):
        for g, w in zip(getattr(got, part), getattr(want, part), strict=True):
            if method == "taylor":  # the hook's gradient is the tensor .grad holds: bit-equal
                assert torch.equal(g, w)
            else:  # sum_i W_ij dL/dW_ij vs sum over tokens of x dL/dx: another summation order
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["taylor", "mask"])
@pytest.mark.parametrize("arch", ARCHS)
def test_scores_from_grads_equal_the_hooks_on_one_process(arch, method, seed):
    model = tiny_model(arch, "seq")
    hooks = ImportanceTracker(model, method=method)
    grads = ImportanceTracker(model, method=method, source="grads")
    # The weights change between steps: the mask estimator must pair each .grad with the
    # weights of its own forward pass.
    _train_steps(model, [hooks, grads], steps=3)
    assert grads.num_batches == hooks.num_batches == 3
    _assert_same_scores(grads.scores(), hooks.scores(), method)
    # After pruning the same reset restarts both.
    prune_(model, heads=3, ffn=40, scores=grads.scores())
    hooks.reset()
    grads.reset()
    _train_steps(model, [hooks, grads], steps=2)
    _assert_same_scores(grads.scores(), hooks.scores(), method)
    assert [len(h) for h in grads.scores().heads] == [3, 3, 3]
    hooks.detach()
    grads.detach()


def test_grads_source_counts_only_explicit_calls_with_gradients(seed):
    model = tiny_model("bert", "seq")
    tracker = ImportanceTracker(model, source="grads")
    batch = random_batch(model)
    model(**batch).logits.sum().backward()  # no hooks: nothing is counted by backward itself
    assert tracker.num_batches == 0
    tracker.accumulate_from_grads()
    assert tracker.num_batches == 1
    model.zero_grad(set_to_none=True)
    tracker.accumulate_from_grads()  # no .grad at all: not a batch
    assert tracker.num_batches == 1
    model(**batch).logits.sum().backward()
    tracker.detach()
    tracker.accumulate_from_grads()  # detached: stops accumulating, like the hooks
    assert tracker.num_batches == 1
    with pytest.raises(RuntimeError, match="source='grads'"):
        ImportanceTracker(model).accumulate_from_grads()
    with pytest.raises(ValueError, match="source must be"):
        ImportanceTracker(model, source="ddp")
    # Pruned without reset(): the accumulators no longer fit.
    tracker.attach()
    prune_(model, heads=[[0, 1]] * 3)
    model(**batch).logits.sum().backward()
    with pytest.raises(RuntimeError, match="call reset"):
        tracker.accumulate_from_grads()


@pytest.mark.parametrize("source", ["hooks", "grads"])
@pytest.mark.parametrize("method", ["taylor", "mask"])
def test_state_round_trip_continues_like_an_uninterrupted_tracker(method, source, seed, tmp_path):
    model = tiny_model("roberta", "seq")
    reference = ImportanceTracker(model, method=method, source=source)
    first = ImportanceTracker(model, method=method, source=source)
    _train_steps(model, [reference, first], steps=2)
    state = first.state_dict()
    first.detach()
    torch.save(state, tmp_path / "importance.pt")  # as a trainer checkpoint stores it
    saved = torch.load(tmp_path / "importance.pt", weights_only=True)
    assert saved["method"] == method and saved["counts"] == [[2] * len(saved["counts"][0])] * 3
    resumed = ImportanceTracker(model, method=method, source=source)
    resumed.load_state_dict(saved)
    assert resumed.num_batches == 2
    _assert_same_scores(resumed.scores(), first.scores(), "taylor")  # loaded exactly
    _train_steps(model, [reference, first, resumed], steps=1)
    assert first.num_batches == 2  # detached: the saved state is a copy that stays put
    assert torch.equal(state["sums"][0][0], saved["sums"][0][0])
    _assert_same_scores(resumed.scores(), reference.scores(), "taylor")
    # The sums mean the same for both sources, so the state moves across them.
    other = ImportanceTracker(model, method=method,
                              source="grads" if source == "hooks" else "hooks")
    other.load_state_dict(resumed.state_dict())
    _assert_same_scores(other.scores(), resumed.scores(), "taylor")
    for tracker in (reference, resumed, other):
        tracker.detach()


def test_state_of_another_method_or_shape_is_rejected(seed):
    model = tiny_model("bert", "seq")
    taylor = ImportanceTracker(model)
    _train_steps(model, [taylor], steps=1)
    state = taylor.state_dict()
    taylor.detach()
    mask = ImportanceTracker(model, method="mask")
    with pytest.raises(ValueError, match="method 'taylor'"):
        mask.load_state_dict(state)
    mask.detach()
    prune_(model, ffn=[list(range(20))] * 3)
    pruned = ImportanceTracker(model)
    with pytest.raises(ValueError, match="another shape"):
        pruned.load_state_dict(state)
    assert pruned.num_batches == 0  # nothing half-loaded
    pruned.detach()


def test_scores_drive_per_layer_top_k(seed):
    model = tiny_model("bert", "seq")
    adapter = adapter_for(model)
    scores = compute_importance(model, _labelled_batches(model, 2))
    pruned = prune_(clone(model), heads=2, ffn=10, scores=scores)
    for i, (dense_layer, layer) in enumerate(
        zip(adapter.layer_list(model), adapter.layer_list(pruned), strict=True)
    ):
        best = torch.argsort(scores.heads[i], descending=True)[:2].sort().values
        rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in best.tolist()])
        q_dense = adapter.attention_linears(dense_layer)[0].weight
        assert torch.equal(adapter.attention_linears(layer)[0].weight, q_dense[rows])
        neurons = torch.argsort(scores.ffn[i], descending=True)[:10].sort().values
        ffn_dense = adapter.ffn_linears(dense_layer)[0].weight
        assert torch.equal(adapter.ffn_linears(layer)[0].weight, ffn_dense[neurons])


def test_top_k_breaks_ties_towards_lower_indices():
    assert top_k(torch.tensor([0.5, 2.0, 0.5, 3.0, 0.5]), 3) == [0, 1, 3]


def _scores(heads, ffn):
    return ImportanceScores(
        heads=[torch.tensor(h, dtype=torch.float32) for h in heads],
        ffn=[torch.tensor(f, dtype=torch.float32) for f in ffn],
        num_batches=1,
        method="taylor",
    )


def test_global_selection_spends_one_budget_across_layers():
    scores = _scores(heads=[[9.0, 8.0, 7.0], [1.0, 0.9, 0.1]], ffn=[[1.0, 2.0], [3.0, 4.0]])
    # Raw scores: layer 0 wins every contested slot; each layer still keeps its best head.
    chosen = select_global(scores, heads=4, normalize=False)
    assert chosen == {"heads": [[0, 1, 2], [0]]}
    # Normalized per layer (0.646, 0.574, 0.503 vs 0.741, 0.667, 0.074), layer 1's second head
    # outranks layer 0's third.
    normalized = select_global(scores, heads=4, ffn=2, normalize=True)
    assert normalized["heads"] == [[0, 1], [0, 1]]
    assert normalized["ffn"] == [[1], [1]]
    assert select_global(scores, heads=2, layers=[1], min_heads=2) == {"heads": [[0, 1]]}


@pytest.mark.parametrize("budget", [1, 7])
def test_global_budget_outside_what_layers_hold_is_rejected(budget):
    scores = _scores(heads=[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], ffn=[[1.0], [1.0]])
    with pytest.raises(ValueError, match="budget"):
        select_global(scores, heads=budget)


def test_compress_with_global_selection_keeps_the_uniform_total(seed):
    model = tiny_model("bert", "seq")
    batches = _labelled_batches(model, 2)
    expected = select_global(compute_importance(clone(model), batches), heads=6, ffn=60)
    compress(model, heads=2, ffn=20, batches=batches, selection="global")
    layout = model_layout(model)
    assert layout.heads == [len(h) for h in expected["heads"]]
    assert layout.intermediate_sizes == [len(f) for f in expected["ffn"]]
    assert sum(layout.heads) == 6 and sum(layout.intermediate_sizes) == 60
