"""KDLoss on real (tiny, random) Hugging Face BERT outputs, teacher forward and quirks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rosita_fast.distill import (
    KDConfig,
    KDLoss,
    LossFunctions,
    apply_relu_before_classifier,
    attention_mse,
    hidden_mse,
    soft_cross_entropy,
    teacher_forward,
)
from rosita_fast.distill.losses import attention_mse_count, hidden_mse_count

transformers = pytest.importorskip("transformers")


def _bert(layers, heads, hidden=32, labels=3, attn="eager", seed=0, dropout=0.1):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=48, max_position_embeddings=32, num_labels=labels,
        attn_implementation=attn, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return transformers.BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (4, 10), generator=g)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids), "labels": torch.tensor([0, 2, 1, 1])}


@pytest.fixture(scope="module")
def models():
    return _bert(4, 4, seed=0), _bert(2, 2, seed=1)


def _run(models, batch, kd):
    teacher, student = models
    student.eval()  # deterministic student outputs for comparisons
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s_out = student(**inputs, **kd.model_kwargs())
    t_out = teacher_forward(teacher, batch, kd)
    return s_out, t_out


def _masked_mse64(a, b, mask):
    d = (a.double() - b.double()) ** 2
    m = mask.bool()
    return d[m].mean().item()


def test_prediction_only_is_the_default(models, batch):
    kd = KDLoss()
    assert kd.model_kwargs() == {"output_hidden_states": False, "output_attentions": False}
    s_out, t_out = _run(models, batch, kd)
    out = kd(s_out, t_out)
    assert set(out.terms) == {"pred"}
    assert out.loss.item() == pytest.approx(soft_cross_entropy(s_out.logits, t_out.logits).item())


def test_hidden_embedding_and_prediction_terms(models, batch):
    config = KDConfig(prediction_weight=0.7, hidden_weight=2.0, embedding_weight=0.5,
                      layer_map="uniform")
    kd = KDLoss(config)
    s_out, t_out = _run(models, batch, kd)
    out = kd(s_out, t_out, attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"]
    emb = _masked_mse64(s_out.hidden_states[0], t_out.hidden_states[0], mask)
    hidden = sum(_masked_mse64(s_out.hidden_states[m], t_out.hidden_states[2 * m], mask)
                 for m in (1, 2))
    pred = soft_cross_entropy(s_out.logits, t_out.logits).item()
    assert out.terms["embedding"].item() == pytest.approx(emb, rel=1e-5)
    assert out.terms["hidden"].item() == pytest.approx(hidden, rel=1e-5)
    assert out.loss.item() == pytest.approx(0.7 * pred + 2.0 * hidden + 0.5 * emb, rel=1e-5)
    out.loss.backward()
    assert all(p.grad is None for p in models[0].parameters())  # teacher untouched
    assert models[1].bert.embeddings.word_embeddings.weight.grad is not None
    models[1].zero_grad(set_to_none=True)


def test_embedding_weight_follows_hidden_weight_and_padding_quirk(models, batch):
    kd = KDLoss(KDConfig(hidden_weight=1.0, layer_map=[0, 1, 4]))
    s_out, t_out = _run(models, batch, kd)
    out = kd(s_out, t_out, attention_mask=batch["attention_mask"])
    assert set(out.terms) == {"pred", "embedding", "hidden"}
    quirk = KDLoss(KDConfig(hidden_weight=1.0, layer_map=[0, 1, 4], hidden_include_padding=True))
    padded = quirk(s_out, t_out, attention_mask=batch["attention_mask"])
    everything = torch.ones_like(batch["attention_mask"])
    expected = sum(_masked_mse64(s_out.hidden_states[s], t_out.hidden_states[t], everything)
                   for s, t in ((1, 1), (2, 4)))
    assert padded.terms["hidden"].item() == pytest.approx(expected, rel=1e-5)
    assert padded.terms["hidden"].item() != pytest.approx(out.terms["hidden"].item(), rel=1e-3)


def test_attention_term_with_head_averaging(models, batch):
    kd = KDLoss(KDConfig(prediction_weight=0.0, attention_weight=1.0, layer_map="uniform",
                         attention_average_heads=True))
    s_out, t_out = _run(models, batch, kd)
    out = kd(s_out, t_out, attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    expected = 0.0
    for m in (1, 2):
        s_map = s_out.attentions[m - 1].double().mean(1)
        t_map = t_out.attentions[2 * m - 1].double().mean(1)
        pair = mask[:, :, None] & mask[:, None, :]
        expected += ((s_map - t_map) ** 2)[pair].mean().item()
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    strict = KDLoss(KDConfig(attention_weight=1.0, layer_map="uniform"))
    with pytest.raises(ValueError, match="attention_average_heads"):
        strict(s_out, t_out)


def test_missing_outputs_give_clear_errors(models, batch):
    teacher, student = models
    kd = KDLoss(KDConfig(hidden_weight=1.0))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = student(**inputs)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        kd(plain, teacher(**inputs))
    sdpa = _bert(2, 2, attn="sdpa")
    att = KDLoss(KDConfig(attention_weight=1.0, attention_average_heads=True))
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        att(sdpa(**inputs, output_attentions=True), teacher_forward(teacher, batch, att))
    with pytest.raises(ValueError, match="needs teacher outputs"):
        KDLoss()(plain)


def test_models_that_do_not_fit_together(models, batch):
    teacher, _ = models
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    kd = KDLoss(KDConfig(hidden_weight=1.0))
    narrow = _bert(2, 2, hidden=16)(**inputs, output_hidden_states=True)
    with pytest.raises(ValueError, match="hidden size 16 != teacher hidden size 32"):
        kd(narrow, teacher_forward(teacher, batch, kd))
    two_labels = _bert(2, 2, labels=2)(**inputs)
    with pytest.raises(ValueError, match="same label set"):
        KDLoss()(two_labels, teacher_forward(teacher, batch, KDLoss()))
    with pytest.raises(ValueError, match="multiple of the student depth"):
        deep = _bert(3, 2)(**inputs, output_hidden_states=True)
        KDLoss(KDConfig(hidden_weight=1.0, layer_map="uniform"))(
            deep, teacher_forward(teacher, batch, kd))


def test_gold_only_needs_no_teacher(models, batch):
    kd = KDLoss(KDConfig(prediction_weight=0.0, gold_weight=1.0))
    assert not kd.needs_teacher
    s_out = models[1].eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    out = kd(s_out, labels=batch["labels"])
    expected = torch.nn.functional.cross_entropy(s_out.logits.double(), batch["labels"])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs labels"):
        kd(s_out)


def test_regression_heads_use_output_mse(batch):
    teacher, student = _bert(2, 2, labels=1, seed=3), _bert(2, 2, labels=1, seed=4).eval()
    kd = KDLoss()
    s_out, t_out = _run((teacher, student), batch, kd)
    expected = ((s_out.logits.double() - t_out.logits.double()) ** 2).mean().item()
    assert kd(s_out, t_out).loss.item() == pytest.approx(expected, rel=1e-5)


def test_teacher_forward_mode_and_dropout_quirk(batch):
    teacher = _bert(2, 2, dropout=0.5)
    kd = KDLoss()
    first = teacher_forward(teacher, batch, kd)
    assert not teacher.training and not first.logits.requires_grad
    assert torch.equal(first.logits, teacher_forward(teacher, batch, kd).logits)
    quirky = KDLoss(KDConfig(teacher_dropout=True))
    noisy = teacher_forward(teacher, batch, quirky)
    assert teacher.training and not torch.equal(noisy.logits, first.logits)


def test_relu_before_classifier_quirk(batch):
    model = _bert(2, 2, dropout=0.5).train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    handle = apply_relu_before_classifier(model)
    model.eval()  # the encoder's own dropout would make outputs random; the head has none now
    pooled = model.bert(**inputs).pooler_output
    weight, bias = model.classifier.weight, model.classifier.bias
    assert torch.allclose(model(**inputs).logits, torch.relu(pooled) @ weight.T + bias, atol=1e-6)
    assert not isinstance(model.dropout, torch.nn.Dropout)
    handle.remove()
    assert torch.allclose(model(**inputs).logits, pooled @ weight.T + bias, atol=1e-6)
    assert isinstance(model.dropout, torch.nn.Dropout) and not model.dropout.training
    with pytest.raises(TypeError, match="no linear 'classifier'"):
        apply_relu_before_classifier(torch.nn.Linear(2, 2))


def test_soft_ce_class_average_quirk_and_t2(models, batch):
    s_out, t_out = _run(models, batch, KDLoss())
    base = KDLoss()(s_out, t_out).loss.item()
    quirk = KDLoss(KDConfig().with_method_quirks())(s_out, t_out).loss.item()
    assert quirk == pytest.approx(base / 3, rel=1e-6)
    hot = KDLoss(KDConfig(temperature=2.0, scale_by_t2=True, prediction_loss="kl"))
    # Plain dicts work as outputs; random-init logits are nearly uniform, so spread them out.
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(5, 3, generator=g) * 3, torch.randn(5, 3, generator=g) * 3
    log_s = torch.log_softmax(s_logits.double() / 2, -1)
    log_t = torch.log_softmax(t_logits.double() / 2, -1)
    kl64 = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item() * 4
    got = hot({"logits": s_logits}, {"logits": t_logits}).loss.item()
    assert got == pytest.approx(kl64, rel=1e-5)


def test_custom_loss_functions_are_used(models, batch):
    calls = []

    def fake_soft_ce(s, t, temperature, **kw):
        calls.append(temperature)
        return s.sum() * 0

    kd = KDLoss(KDConfig(temperature=3.0),
                functions=dataclasses.replace(LossFunctions(), soft_cross_entropy=fake_soft_ce))
    s_out, t_out = _run(models, batch, kd)
    assert kd(s_out, t_out).loss.item() == 0.0 and calls == [3.0]


def test_config_validation_and_round_trip():
    config = KDConfig(hidden_weight=1.0, layer_map=[0, 1, 3, 4, 6, 7, 9, 10, 12])
    assert KDConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown distillation option.*hiden_weight"):
        KDConfig.from_dict({"hiden_weight": 1.0})
    with pytest.raises(TypeError, match="hidden_weight must be a number"):
        KDConfig.from_dict({"hidden_weight": "1"})
    with pytest.raises(TypeError, match="teacher_dropout must be true or false"):
        KDConfig(teacher_dropout="yes")
    with pytest.raises(ValueError, match="temperature"):
        KDConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        KDConfig(prediction_weight=0.0)
    with pytest.raises(ValueError, match="prediction_loss"):
        KDConfig(prediction_loss="mse")


# ---- data-parallel normalisation -------------------------------------------------------------

def _padded(lengths, seed):
    """Rows of the given real lengths, padded (id 0, mask 0) to the longest, as dynamic padding
    pads each process's share of a batch."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, 120, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = 0
    labels = torch.randint(0, 3, (len(lengths),), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": labels}


def _student_grads(student, teacher, kd, batch):
    """The loss output and the student's parameter gradients on ``batch``."""
    student.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = kd(student(**inputs, **kd.model_kwargs()), teacher_forward(teacher, batch, kd),
             attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_rescaled_token_terms_give_the_global_batch_gradient():
    # Two simulated ranks hold 17 and 8 real tokens (padded to 10 and 5); DDP averages their
    # gradients. Only with the rescaling is that average the global batch's gradient.
    teacher, student = _bert(4, 4, seed=0), _bert(2, 2, seed=1, dropout=0.0).eval()
    config = KDConfig(hidden_weight=1.0, attention_weight=1.0, attention_average_heads=True,
                      gold_weight=0.5, layer_map="uniform")
    lengths = [10, 7, 5, 3]
    full = _padded(lengths, seed=2)
    shares = [{k: v[rows, :width] if v.dim() == 2 else v[rows] for k, v in full.items()}
              for rows, width in ((slice(0, 2), 10), (slice(2, 4), 5))]
    global_out, want = _student_grads(student, teacher, KDLoss(config), full)

    local_counts = []

    def record(counts):  # identity: every rank's counts are its own mean, i.e. no rescaling
        local_counts.append(counts.clone())
        return counts

    plain = [_student_grads(student, teacher, KDLoss(config, average_counts=record), share)
             for share in shares]
    # One collective per loss evaluation, carrying the token count and the token-pair count.
    assert [c.tolist() for c in local_counts] == [[17.0, 149.0], [8.0, 34.0]]
    mean_counts = torch.stack(local_counts).mean(0)
    scaled = [_student_grads(student, teacher,
                             KDLoss(config, average_counts=lambda counts: mean_counts), share)
              for share in shares]

    def ddp_average(results):
        return {n: (results[0][1][n] + results[1][1][n]) / 2 for n in want}

    got, unscaled = ddp_average(scaled), ddp_average(plain)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    # Without the rescaling the ranks' 8 short-sequence tokens weigh twice as much as the rest.
    assert any(not torch.allclose(unscaled[n], want[n], rtol=1e-2, atol=1e-5) for n in want)
    # The ranks' losses average to the global loss; the reported terms stay per-rank means.
    mean_loss = (scaled[0][0].loss + scaled[1][0].loss) / 2
    assert mean_loss.item() == pytest.approx(global_out.loss.item(), rel=1e-5)
    for (s_out, _), (p_out, _) in zip(scaled, plain, strict=True):
        assert s_out.terms.keys() == p_out.terms.keys() == global_out.terms.keys()
        for term in s_out.terms:
            assert torch.equal(s_out.terms[term], p_out.terms[term]), term
    student.zero_grad(set_to_none=True)


def test_no_count_collective_without_token_terms(models, batch):
    calls = []
    kd = KDLoss(KDConfig(gold_weight=1.0), average_counts=lambda c: calls.append(c) or c)
    s_out, t_out = _run(models, batch, kd)
    assert kd(s_out, t_out, attention_mask=batch["attention_mask"],
              labels=batch["labels"]).loss.item() == pytest.approx(
        KDLoss(KDConfig(gold_weight=1.0))(s_out, t_out, labels=batch["labels"]).loss.item())
    assert calls == []  # example-level terms are exact under DDP as they are


def test_counts_are_the_denominators_of_the_token_means():
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    s, t = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    sq = ((s - t) ** 2).sum(-1)
    assert hidden_mse_count(s, mask).item() == 6.0
    assert (hidden_mse(s, t, mask) * hidden_mse_count(s, mask) * 8).item() == pytest.approx(
        sq[mask.bool()].sum().item(), rel=1e-6)
    assert hidden_mse_count(s).item() == 12.0
    a_s, a_t = torch.rand(3, 2, 4, 4, generator=g), torch.rand(3, 2, 4, 4, generator=g)
    pair = (mask[:, :, None] * mask[:, None, :]).bool()[:, None].expand(-1, 2, -1, -1)
    assert attention_mse_count(a_s, mask).item() == 9 + 4 + 1
    assert (attention_mse(a_s, a_t, mask) * attention_mse_count(a_s, mask) * 2).item() == \
        pytest.approx(((a_s - a_t) ** 2)[pair].sum().item(), rel=1e-6)
    assert attention_mse_count(a_s).item() == 3 * 4 * 4
