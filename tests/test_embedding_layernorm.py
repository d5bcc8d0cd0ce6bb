"""embedding_layernorm: every runnable backend against a float64 reference, forward and backward,
and against the Hugging Face embedding modules it replaces."""

from __future__ import annotations

import threading

import pytest
import torch
from kernel_harness import DTYPES, assert_close, rand, runnable_backends

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops.embedding_layernorm import reference_backward, reference_forward
from rosita_fast.testing import poison_outputs

# The Triton backend has its own file (test_embedding_layernorm_triton.py): it runs under the
# interpreter, which is slow, and has no float64 kernels.
BACKENDS = [p for p in runnable_backends("embedding_layernorm") if p.values[0] != "triton"]
NATIVE = [p for p in BACKENDS if p.values[0] != "reference"]
GRAD_NAMES = ("word_weight", "position_weight", "token_type_weight", "ln_weight", "ln_bias",
              "word_proj")

# (B, L, hidden, vocab, rank or None (dense), token types, positions [1, L], padding rows):
# odd sizes, B*L a multiple of nothing, vocabularies small enough that ids repeat (rows summed over
# several tokens) and the padding rows occur.
CONFIGS = [
    (3, 7, 32, 50, None, True, True, True),
    (2, 13, 40, 37, 16, True, False, True),
    (5, 11, 96, 100, None, False, False, True),  # MPNet-like: no token types
    (1, 37, 768, 200, 128, True, True, False),
    (4, 9, 768, 300, None, True, False, True),
    (3, 5, 33, 29, 7, False, True, True),
]


def _inputs(b, length, hidden, vocab, rank, tt, pos1, pad, dtype, contiguous=True, max_pos=64,
            types=3):
    ids = torch.randint(0, vocab, (b, length))
    pad_idx = pos_pad = None
    if pad:
        pad_idx, pos_pad = 1, 2
        ids[0, -1] = pad_idx  # the padding rows occur in the ids
    pos_ids = torch.randint(0, max_pos, (1 if pos1 else b, length))
    if pad:
        pos_ids[0, 0] = pos_pad
    word = rand(vocab, rank or hidden, dtype=dtype, contiguous=contiguous)
    proj = rand(hidden, rank, dtype=dtype, contiguous=contiguous,
                scale=rank**-0.5) if rank else None
    pos = rand(max_pos, hidden, dtype=dtype, contiguous=contiguous)
    tt_ids = torch.randint(0, types, (b, length)) if tt else None
    tt_w = rand(types, hidden, dtype=dtype) if tt else None
    gamma = (1 + 0.5 * torch.randn(hidden)).to(dtype)
    beta = (0.5 * torch.randn(hidden)).to(dtype)
    return [ids, word, pos_ids, pos, tt_ids, tt_w, gamma, beta, 1e-5, proj, pad_idx, pos_pad]


def _floats(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]


def _reference64(args):
    args64 = [a.detach().double().requires_grad_(True)
              if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    return reference_forward(*args64), args64


def _grad_targets(args):
    # (name, tensor) of every differentiable input, in GRAD_NAMES order.
    named = dict(zip(("word_weight", "position_weight", "token_type_weight", "ln_weight",
                      "ln_bias", "word_proj"), (args[1], args[3], args[5], args[6], args[7],
                                                args[9]), strict=True))
    return [(n, t) for n, t in named.items() if t is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_forward_backward(backend, dtype, config, seed):
    b, length, hidden, vocab, rank, tt, pos1, pad = config
    args = _inputs(*config, dtype, contiguous=seed % 2 == 0)  # half the runs on strided tables
    targets = _grad_targets(args)
    for _, t in targets:
        t.requires_grad_(True)
    with rosita_fast.use_backend(backend), poison_outputs():
        out = ops.embedding_layernorm(*args)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [t for _, t in targets], grad_out)
    ref, args64 = _reference64(args)
    assert out.dtype == dtype and out.shape == (b, length, hidden)
    assert_close(out, ref, dtype, f"{backend} forward", k=hidden)
    ref_grads = torch.autograd.grad(ref, [t for _, t in _grad_targets(args64)], grad_out.double())
    n = b * length
    for (name, t), g, rg in zip(targets, grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.shape == t.shape, name
        assert_close(g, rg, dtype, f"{backend} d{name}", k=max(hidden, n))
    if pad:  # the padding rows get no gradient (nn.Embedding(padding_idx=...))
        assert (grads[0][args[10]] == 0).all() and (grads[1][args[11]] == 0).all()


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [None, 24], ids=["dense", "factorized"])
def test_backward_with_kept_statistics_matches_recompute(backend, dtype, rank, seed):
    args = _inputs(6, 23, 72, 90, rank, True, False, True, dtype)
    grad = rand(6, 23, 72, dtype=dtype)
    with rosita_fast.use_backend(backend), poison_outputs():
        out, mean, rstd, word = torch.ops.rosita_fast.embedding_layernorm_train(*args)
        kept = torch.ops.rosita_fast.embedding_layernorm_backward(grad, *args, mean, rstd, word)
        recomputed = torch.ops.rosita_fast.embedding_layernorm_backward(grad, *args)
    assert mean.shape == rstd.shape == (6, 23) and mean.dtype == torch.float32
    assert word.shape == ((6, 23, 72) if rank else (0,))
    ref = reference_backward(grad.double(), *(a.double() if isinstance(a, torch.Tensor)
                                              and a.is_floating_point() else a for a in args))
    for name, x, y, r in zip(("word", "proj", "pos", "tt", "gamma", "beta"), kept, recomputed,
                             ref, strict=True):
        if r is None:
            assert x.numel() == 0 and y.numel() == 0
            continue
        assert_close(x, r, dtype, f"{backend} d{name} (kept statistics)", k=138)
        assert_close(y, r, dtype, f"{backend} d{name} (recomputed)", k=138)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [None, 3], ids=["dense", "factorized"])
def test_gradcheck_float64(backend, rank, seed):
    # Without padding rows: their zero gradient is a convention, not the derivative.
    args = _inputs(2, 3, 5, 6, rank, True, False, False, torch.float64, max_pos=5, types=2)
    targets = [t.requires_grad_(True) for _, t in _grad_targets(args)]
    slots = [1, 3, 5, 6, 7] + ([9] if rank else [])

    def fn(*tensors):
        call = list(args)
        for slot, t in zip(slots, tensors, strict=True):
            call[slot] = t
        return ops.embedding_layernorm(*call)

    with rosita_fast.use_backend(backend):
        assert torch.autograd.gradcheck(fn, targets, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_hf_bert_and_factorized_student(backend, seed):
    # Independent of the reference: the stock HF module and the project's factorized student
    # embedding (RositaBertModel with embedding_rank), forward and every gradient.
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertEmbeddings

    from rosita_fast.models.bert import RositaBertConfig, RositaBertModel

    sizes = dict(vocab_size=99, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=40, max_position_embeddings=40, type_vocab_size=2,
                 pad_token_id=0, layer_norm_eps=1e-12)
    dense = BertEmbeddings(BertConfig(**sizes)).eval()
    student = RositaBertModel(RositaBertConfig(embedding_rank=12, **sizes)).embeddings.eval()
    ids = torch.randint(1, 99, (3, 17))
    ids[:, -3:] = 0  # padding
    tt = torch.randint(0, 2, (3, 17))
    for module in (dense, student):
        with torch.no_grad():
            module.LayerNorm.weight.normal_(1, 0.3)
            module.LayerNorm.bias.normal_(0, 0.3)
        expected = module(input_ids=ids, token_type_ids=tt)
        word = module.word_embeddings
        factorized = word.__class__.__name__ == "FactorizedEmbedding"
        table, proj = (word.lookup.weight, word.project.weight) if factorized else (word.weight,
                                                                                   None)
        with rosita_fast.use_backend(backend):
            out = ops.embedding_layernorm(
                ids, table, module.position_ids[:, :17], module.position_embeddings.weight, tt,
                module.token_type_embeddings.weight, module.LayerNorm.weight,
                module.LayerNorm.bias, module.LayerNorm.eps, word_proj=proj,
                padding_idx=word.padding_idx)
        assert_close(out, expected, torch.float32, f"{backend} {type(word).__name__} forward")
        params = [p for p in module.parameters()]
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, params, grad, allow_unused=True)
        want = torch.autograd.grad(expected, params, grad, allow_unused=True)
        for (name, _), g, w in zip(module.named_parameters(), got, want, strict=True):
            assert g is not None and w is not None, name
            assert_close(g, w, torch.float32, f"{backend} {name} grad", factor=3)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("arch", ["roberta", "mpnet"])
def test_matches_hf_roberta_and_mpnet(backend, arch, seed):
    # Position tables with a padding row (position_padding_idx); MPNet has no token types.
    if arch == "roberta":
        from transformers import RobertaConfig
        from transformers.models.roberta.modeling_roberta import RobertaEmbeddings as Module

        config = RobertaConfig(vocab_size=70, hidden_size=40, max_position_embeddings=30,
                               type_vocab_size=1, pad_token_id=1, num_attention_heads=2)
        make_pos = Module.create_position_ids_from_input_ids
    else:
        from transformers import MPNetConfig
        from transformers.models.mpnet.modeling_mpnet import MPNetEmbeddings as Module
        from transformers.models.mpnet.modeling_mpnet import (
            create_position_ids_from_input_ids as make_pos,
        )

        config = MPNetConfig(vocab_size=70, hidden_size=40, max_position_embeddings=30,
                             num_attention_heads=2)
    module = Module(config).eval()
    ids = torch.randint(2, 70, (4, 19))
    ids[1:, -5:] = 1  # padding
    expected = module(input_ids=ids)
    pos = make_pos(ids, 1)
    tt = getattr(module, "token_type_embeddings", None)
    with rosita_fast.use_backend(backend):
        out = ops.embedding_layernorm(
            ids, module.word_embeddings.weight, pos, module.position_embeddings.weight,
            torch.zeros_like(ids) if tt is not None else None,
            tt.weight if tt is not None else None,
            module.LayerNorm.weight, module.LayerNorm.bias, module.LayerNorm.eps,
            padding_idx=module.word_embeddings.padding_idx,
            position_padding_idx=module.position_embeddings.padding_idx)
    assert_close(out, expected, torch.float32, f"{backend} {arch} forward")
    params = list(module.parameters())
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(expected, params, grad)
    for (name, _), g, w in zip(module.named_parameters(), got, want, strict=True):
        assert_close(g, w, torch.float32, f"{backend} {arch} {name} grad", factor=3)


@pytest.mark.parametrize("backend", NATIVE)
def test_cpp_results_do_not_depend_on_the_thread_count(backend, seed):
    # Deterministic table gradients: no atomics, sums in token order, fixed row blocks.
    args = _inputs(8, 41, 96, 60, 24, True, True, True, torch.float32)
    targets = [t.requires_grad_(True) for _, t in _grad_targets(args)]
    grad = torch.randn(8, 41, 96)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            with rosita_fast.use_backend(backend):
                out = ops.embedding_layernorm(*args)
                results.append((out, *torch.autograd.grad(out, targets, grad)))
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(*results, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=str)
def test_empty_batch(backend, shape, seed):
    args = _inputs(1, 1, 16, 10, 4, True, False, True, torch.float32)
    args[0] = torch.zeros(shape, dtype=torch.long)
    args[2] = torch.zeros(shape, dtype=torch.long)
    args[4] = torch.zeros(shape, dtype=torch.long)
    targets = [t.requires_grad_(True) for _, t in _grad_targets(args)]
    with rosita_fast.use_backend(backend):
        out = ops.embedding_layernorm(*args)
        assert out.shape == (*shape, 16)
        grads = torch.autograd.grad(out.sum(), targets)
    for g in grads:  # no tokens: every gradient is exactly zero
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_and_broadcast_token_types(backend, seed):
    args = _inputs(3, 8, 24, 30, None, True, True, False, torch.float32)
    args[0], args[2] = args[0].int(), args[2].int()
    args[4] = args[4][:1].int()  # [1, L], broadcast like the positions
    expected = reference_forward(*args[:4], args[4].expand(3, 8), *args[5:])
    with rosita_fast.use_backend(backend):
        out = ops.embedding_layernorm(*args)
    assert_close(out, expected, torch.float32, f"{backend} int32 ids")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_fast_path_matches_autograd_path(backend, seed):
    args = _inputs(2, 9, 40, 30, 8, True, False, True, torch.float32)
    with rosita_fast.use_backend(backend):
        with torch.no_grad():
            fast = ops.embedding_layernorm(*args)
        args[1].requires_grad_(True)
        recorded = ops.embedding_layernorm(*args)
    assert torch.equal(fast, recorded.detach())


def test_autocast_keeps_the_weights_dtype(seed):
    # Like F.embedding and an fp32 F.layer_norm under CPU autocast: nothing is cast.
    args = _inputs(2, 6, 32, 20, 8, True, False, False, torch.float32)
    expected = ops.embedding_layernorm(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.embedding_layernorm(*args)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_torch_compile_fullgraph(seed):
    args = _inputs(3, 10, 48, 40, 12, True, True, True, torch.float32)
    targets = [t.requires_grad_(True) for _, t in _grad_targets(args)]

    def fn(*call):
        return ops.embedding_layernorm(*call) * 2

    expected = fn(*args)
    out = torch.compile(fn, fullgraph=True)(*args)
    assert_close(out, expected, torch.float32, "compiled forward")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, targets, grad)
    want = torch.autograd.grad(expected, targets, grad)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, torch.float32, "compiled backward")


def test_opcheck(seed):
    # Schema, fake tensor kernels, autograd registration and dispatcher consistency of the public,
    # training and backward ops.
    for rank, tt in ((None, True), (6, False)):
        args = _inputs(2, 5, 16, 12, rank, tt, True, True, torch.float32)
        for _, t in _grad_targets(args):
            t.requires_grad_(True)
        torch.library.opcheck(torch.ops.rosita_fast.embedding_layernorm.default, tuple(args))
        torch.library.opcheck(torch.ops.rosita_fast.embedding_layernorm_train.default,
                              tuple(args))
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        _, mean, rstd, word = torch.ops.rosita_fast.embedding_layernorm_train(*plain)
        grad = torch.randn(2, 5, 16)
        backward = torch.ops.rosita_fast.embedding_layernorm_backward.default
        torch.library.opcheck(backward, (grad, *plain, mean, rstd, word))
        torch.library.opcheck(backward, (grad, *plain))


def test_training_forward_keeps_statistics_for_the_backward(monkeypatch, seed):
    from rosita_fast.ops import REGISTRY

    impls = REGISTRY["embedding_layernorm_backward"].impls
    real, seen = impls["reference"], []
    monkeypatch.setitem(impls, "reference", lambda *a: seen.append(a[-3:]) or real(*a))
    args = _inputs(2, 4, 16, 10, 5, True, False, False, torch.float32)
    args[1].requires_grad_(True)
    with rosita_fast.use_backend("reference"):
        ops.embedding_layernorm(*args).sum().backward()
    ((mean, rstd, word),) = seen
    assert mean.shape == rstd.shape == (2, 4) and word.shape == (2, 4, 16)


def test_forced_backend_reaches_a_backward_on_another_thread(monkeypatch, seed):
    from rosita_fast.ops import REGISTRY

    impls = REGISTRY["embedding_layernorm_backward"].impls
    real, calls = impls["reference"], []
    monkeypatch.setitem(impls, "reference", lambda *a: calls.append(1) or real(*a))
    args = _inputs(2, 4, 16, 10, None, True, False, False, torch.float32)
    args[1].requires_grad_(True)
    with rosita_fast.use_backend("reference"):
        out = ops.embedding_layernorm(*args)
    worker = threading.Thread(target=lambda: out.sum().backward())
    worker.start()
    worker.join()
    assert calls == [1] and args[1].grad is not None


class TestBadInput:
    def setup_method(self):
        self.args = _inputs(2, 6, 16, 10, None, True, False, True, torch.float32, max_pos=8,
                            types=2)

    def call(self, **changes):
        slots = {"input_ids": 0, "word_weight": 1, "position_ids": 2, "position_weight": 3,
                 "token_type_ids": 4, "token_type_weight": 5, "ln_weight": 6, "ln_bias": 7,
                 "eps": 8, "word_proj": 9, "padding_idx": 10, "position_padding_idx": 11}
        args = list(self.args)
        for name, value in changes.items():
            args[slots[name]] = value
        return ops.embedding_layernorm(*args)

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
    def test_out_of_range_ids_name_the_value(self, backend, grad):
        self.args[1].requires_grad_(grad)
        ids = self.args[0].clone()
        ids[1, 3] = 10
        pos = self.args[2].clone()
        pos[0, 2] = -1
        tt = self.args[4].clone()
        tt[1, 1] = 7
        with rosita_fast.use_backend(backend):
            with pytest.raises(IndexError, match="input_ids contains 10, out of range .* 10 rows"):
                self.call(input_ids=ids)
            with pytest.raises(IndexError, match="position_ids contains -1"):
                self.call(position_ids=pos)
            with pytest.raises(IndexError, match="token_type_ids contains 7"):
                self.call(token_type_ids=tt)

    def test_shapes(self):
        with pytest.raises(ValueError, match="input_ids must be 2-D"):
            self.call(input_ids=self.args[0].reshape(-1))
        with pytest.raises(ValueError, match="position_ids must be"):
            self.call(position_ids=self.args[2][:, :3])
        with pytest.raises(ValueError, match="token_type_ids must be"):
            self.call(token_type_ids=torch.zeros(3, 6, dtype=torch.long))
        with pytest.raises(ValueError, match="word_weight is \\(10, 17\\)"):
            self.call(word_weight=rand(10, 17))
        with pytest.raises(ValueError, match="word_proj must be \\[hidden, rank\\]"):
            self.call(word_weight=rand(10, 4), word_proj=rand(16, 5))
        with pytest.raises(ValueError, match="position_weight must be \\[rows, hidden=16\\]"):
            self.call(position_weight=rand(8, 15))
        with pytest.raises(ValueError, match="ln_bias must have shape \\(16,\\)"):
            self.call(ln_bias=rand(15))
        with pytest.raises(ValueError, match="both be given or both be None"):
            self.call(token_type_weight=None)

    def test_dtypes_and_devices(self):
        with pytest.raises(TypeError, match="position_weight has dtype torch.float16"):
            self.call(position_weight=self.args[3].half())
        with pytest.raises(TypeError, match="input_ids has dtype torch.float32"):
            self.call(input_ids=self.args[0].float())
        with pytest.raises(TypeError, match="word_weight has dtype torch.int64"):
            self.call(word_weight=self.args[1].long())
        with pytest.raises(ValueError, match="ln_weight is on meta"):
            self.call(ln_weight=self.args[6].to("meta"))
        with pytest.raises(TypeError, match="ln_bias must be a torch.Tensor"):
            self.call(ln_bias=[0.0] * 16)

    def test_padding_and_eps(self):
        with pytest.raises(ValueError, match="padding_idx 10 is out of range"):
            self.call(padding_idx=10)
        with pytest.raises(ValueError, match="position_padding_idx -9 is out of range"):
            self.call(position_padding_idx=-9)
        with pytest.raises(TypeError, match="padding_idx must be an int"):
            self.call(padding_idx=1.0)
        with pytest.raises(ValueError, match="eps must be a non-negative float"):
            self.call(eps=-1.0)
        assert self.call(eps=0).shape == (2, 6, 16)  # an int eps is a float


def test_negative_padding_idx_is_a_row_from_the_end(seed):
    args = _inputs(2, 6, 16, 10, None, False, False, False, torch.float32)
    args[0][0, 0] = 9
    args[1].requires_grad_(True)
    for backend in ("reference", *(p.values[0] for p in NATIVE)):
        with rosita_fast.use_backend(backend):
            args[1].grad = None
            ops.embedding_layernorm(*args[:10], -1, None).sum().backward()
        assert (args[1].grad[9] == 0).all(), backend
