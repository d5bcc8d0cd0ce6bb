"""The Triton embedding_layernorm kernels (``rosita_fast.kernels.embedding_layernorm``) in the CPU
interpreter, against the float64 reference of ``rosita_fast.ops.embedding_layernorm``
(``reference_forward``, ``reference_backward``).

Every case forces 16-wide GEMM tiles and a few tokens per row program (``forced_tiles``), and
most force fewer backward row programs than token blocks, so each loops over several: token
counts, hidden sizes, vocabularies and ranks of a few dozen, none a multiple of 16, cross several
blocks in every dimension. Covered: dense and factorized word tables, with no, two (summed in
registers) and three (summed with atomics) token types, ``padding_idx`` /
``position_padding_idx`` (also negative) whose rows get exactly zero gradient, repeated ids,
``[1, L]`` and ``[B, L]`` position / token type ids, int64 and int32 ids, strided / transposed
tables and upstream gradient, fp32 / fp16 / bf16 (and the native fp16 path of the projection),
the backward with the training forward's mean / rstd / projected rows and with recomputed ones,
empty batches, out-of-range ids, NaN-poisoned outputs. Then the public op under
``use_backend("triton")`` (switched on once the op's tables have a triton entry) and the launch
specs the lowering tests compile.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from kernel_harness import (
    assert_close,
    declared_constexprs,
    f64,
    make,
    spec_matches_launch,
)
from rosita_fast.kernels import embedding_layernorm as ek
from rosita_fast.kernels import linear_act as la

import rosita_fast
from rosita_fast.ops.embedding_layernorm import reference_backward, reference_forward
from rosita_fast.testing import poison_outputs

pytestmark = pytest.mark.usefixtures("seed")

BLOCK = 16  # forced GEMM tile of every launch in this file
EPS = 1e-5
TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    id: str
    dtype: torch.dtype
    b: int
    length: int
    vocab: int
    hidden: int
    rank: int | None = None  # factorized word table [vocab, rank], None: dense
    token_types: int = 2  # rows of the token type table, 0: none
    padding_idx: int | None = None
    position_padding_idx: int | None = None
    batch_positions: bool = False  # [B, L] position ids instead of [1, L]
    id_dtype: torch.dtype = torch.int64
    word: str = "contig"  # layout of the word table
    proj: str = "contig"
    grad: str = "contig"
    kept: str = "all"  # from the training forward: "all", "stats" (mean / rstd), "none"
    rows: int = 2  # tokens per row program
    programs: int | None = 3  # backward row programs (None: one per token block)
    upcast: bool | None = None  # None: the default (upcast under the interpreter)


CASES = [
    Case("fp32-dense-tt2-padding", torch.float32, 3, 13, 50, 40, padding_idx=1,
         position_padding_idx=0, grad="strided"),
    Case("bf16-dense-nott-negpad-int32", torch.bfloat16, 2, 17, 40, 48, token_types=0,
         padding_idx=-39, id_dtype=torch.int32, kept="none", rows=4),
    Case("fp16-dense-tt3-strided", torch.float16, 3, 11, 30, 36, token_types=3,
         batch_positions=True, word="strided", grad="transposed", programs=None),
    Case("fp32-fact-tt2", torch.float32, 2, 19, 45, 40, rank=24, padding_idx=0,
         proj="transposed", rows=4, programs=2),
    Case("bf16-fact-tt3-recompute", torch.bfloat16, 3, 9, 35, 44, rank=20, token_types=3,
         padding_idx=2, position_padding_idx=1, kept="none", word="strided"),
    Case("fp16-fact-stats_only", torch.float16, 2, 15, 33, 40, rank=36, token_types=1,
         kept="stats", proj="strided", batch_positions=True),
    Case("fp32-dense-long_rows-expanded_grad", torch.float32, 2, 10, 20, 300, token_types=2,
         grad="expanded", rows=1, programs=4, kept="none"),
    # the native fp16 path of the factorized products (operands to tl.dot in fp16, dx rounded to
    # fp16 for them; the interpreter multiplies fp16 correctly, bf16 only upcast)
    Case("fp16-native-fact", torch.float16, 3, 12, 40, 48, rank=32, padding_idx=3,
         upcast=False),
]


def _inputs(case: Case):
    b, length, dtype = case.b, case.length, case.dtype
    ids = torch.randint(0, case.vocab, (b, length))
    if b > 1:
        if case.padding_idx is not None:
            ids[0, :3] = case.padding_idx % case.vocab  # padding tokens, repeated
        ids[1, 3:6] = 4  # a repeated id
    n_pos = length + 3
    if case.batch_positions:
        pos_ids = torch.randint(0, n_pos, (b, length))
    else:
        pos_ids = torch.arange(length)[None]
    if case.position_padding_idx is not None:
        pos_ids = pos_ids.clone()
        pos_ids[..., -1] = case.position_padding_idx
    tt_ids = torch.randint(0, case.token_types, (b, length)) if case.token_types else None
    width = case.rank if case.rank is not None else case.hidden
    word = make((case.vocab, width), case.word, dtype)
    proj = (make((case.hidden, case.rank), case.proj, dtype, scale=case.rank ** -0.5)
            if case.rank is not None else None)
    pos_w = make((n_pos, case.hidden), "contig", dtype)
    tt_w = make((case.token_types, case.hidden), "contig", dtype) if case.token_types else None
    ln_w = make((case.hidden,), "contig", dtype, scale=0.2, shift=1.0)
    ln_b = make((case.hidden,), "contig", dtype, scale=0.2)
    args = (ids.to(case.id_dtype), word, pos_ids.to(case.id_dtype), pos_w,
            tt_ids.to(case.id_dtype) if tt_ids is not None else None, tt_w, ln_w, ln_b, EPS,
            proj, case.padding_idx, case.position_padding_idx)
    grad = make((b, length, case.hidden), case.grad, dtype)
    return args, grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_and_backward_match_float64(case: Case):
    args, grad = _inputs(case)
    (ids, word_w, pos_ids, pos_w, tt_ids, tt_w, ln_w, ln_b, eps, proj, pad, pos_pad) = args
    b, length, h = case.b, case.length, case.hidden
    args64 = tuple(f64(a) for a in args)
    ref_out = reference_forward(*args64)
    ref_grads = reference_backward(grad.double(), *args64)
    with la.forced_tiles(BLOCK, rows=case.rows, programs=case.programs), poison_outputs():
        out = ek.embedding_layernorm_forward(*args, upcast=case.upcast)
        out_t, mean, rstd, word = ek.embedding_layernorm_train(*args, upcast=case.upcast)
        kept = {"all": (mean, rstd, word), "stats": (mean, rstd, None),
                "none": (None, None, None)}[case.kept]
        grads = ek.embedding_layernorm_backward(grad, *args, *kept, upcast=case.upcast)
    assert out.dtype == case.dtype and out.shape == (b, length, h) and out.is_contiguous()
    assert torch.equal(out, out_t), "forward and training forward run the same kernels"
    k = max(b * length, h, case.rank or 1)
    assert_close(out, ref_out, case.dtype, f"{case.id}: out", k=k)
    # the training forward's statistics and projected rows, fp32
    rows64 = word_w.double()[ids.long()]
    if proj is not None:
        rows64 = rows64 @ proj.double().t()
    x64 = rows64 + pos_w.double()[pos_ids.long().expand(b, length)]
    if tt_w is not None:
        x64 = x64 + tt_w.double()[tt_ids.long().expand(b, length)]
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (b, length)
    assert_close(mean, x64.mean(-1), case.dtype, f"{case.id}: mean", k=k)
    assert_close(rstd, torch.rsqrt(x64.var(-1, unbiased=False) + EPS), case.dtype,
                 f"{case.id}: rstd", k=k)
    assert word.dtype == torch.float32
    if proj is not None:
        assert word.shape == (b, length, h)
        assert_close(word, rows64, case.dtype, f"{case.id}: word rows", k=k)
    else:
        assert word.numel() == 0
    names = ("d_word", "d_proj", "d_pos", "d_tt", "d_ln_weight", "d_ln_bias")
    likes = (word_w, proj, pos_w, tt_w, ln_w, ln_b)
    for name, got, want, like in zip(names, grads, ref_grads, likes, strict=True):
        if like is None:
            assert got.numel() == 0, f"{name}: an empty tensor stands for an absent table"
            continue
        assert got.dtype == case.dtype and got.shape == like.shape, name
        assert_close(got, want, case.dtype, f"{case.id}: {name}", k=k)
    if pad is not None:
        assert (grads[0][pad] == 0).all(), "the padding_idx row gets no gradient"
    if pos_pad is not None:
        assert (grads[2][pos_pad] == 0).all(), "the position_padding_idx row gets no gradient"


def test_forced_tiles_set_the_grids(monkeypatch):
    """The forced tiles really set the grids: several tokens per row program, backward programs
    looping over several token blocks, several GEMM blocks in every dimension."""
    grids = {}
    for name in ("embedding_ln_fwd_kernel", "embedding_ln_bwd_kernel",
                 "embedding_matmul_kernel"):
        kernel = getattr(ek, name)

        def recorder(kernel=kernel, name=name):
            class Recorder:
                def __getitem__(self, grid):
                    grids.setdefault(name, []).append(grid)
                    return kernel[grid]

            return Recorder()

        monkeypatch.setattr(ek, name, recorder())
    case = Case("grid", torch.float32, 2, 20, 45, 40, rank=35, padding_idx=0)
    args, grad = _inputs(case)
    with la.forced_tiles(BLOCK, rows=4, programs=3), poison_outputs():
        _, mean, rstd, word = ek.embedding_layernorm_train(*args)
        grads = ek.embedding_layernorm_backward(grad, *args, mean, rstd, word)
    # 40 tokens -> 10 row blocks of 4, 3 GEMM blocks; hidden 40 -> 3; rank 35 -> 3
    assert grids == {
        "embedding_matmul_kernel": [(9,), (9,), (9,)],  # projection, d_word, d_proj
        "embedding_ln_fwd_kernel": [(10,)],
        "embedding_ln_bwd_kernel": [(3,)],
    }
    ref = reference_backward(grad.double(), *(f64(a) for a in args))
    for i, (got, want) in enumerate(zip(grads, ref, strict=True)):
        assert_close(got, want, torch.float32, f"grad {i}")


def test_default_tiles_match_forced_tiles():
    """The launch-table tiles (one block / row tile here) agree with the forced ones."""
    case = Case("default", torch.float32, 2, 9, 30, 40, rank=20, token_types=3, padding_idx=1)
    args, grad = _inputs(case)
    out, mean, rstd, word = ek.embedding_layernorm_train(*args)
    grads = ek.embedding_layernorm_backward(grad, *args, mean, rstd, word)
    with la.forced_tiles(BLOCK, rows=2, programs=2):
        small = ek.embedding_layernorm_train(*args)
        small_grads = ek.embedding_layernorm_backward(grad, *args, *small[1:])
    for got, want in zip((*small, *small_grads), (out, mean, rstd, word, *grads), strict=True):
        assert_close(got, want.double(), torch.float32, "table vs forced tiles")


@pytest.mark.parametrize("rank", [None, 12], ids=["dense", "factorized"])
def test_empty_batch(rank):
    """No tokens: an empty output, zero gradients for every table and parameter."""
    case = Case("empty", torch.float32, 0, 7, 20, 24, rank=rank)
    args, grad = _inputs(case)
    with la.forced_tiles(BLOCK), poison_outputs():
        out, mean, rstd, word = ek.embedding_layernorm_train(*args)
        grads = ek.embedding_layernorm_backward(grad, *args, mean, rstd, word)
    assert out.shape == (0, 7, 24) and mean.shape == rstd.shape == (0, 7)
    for got, like in zip(grads, (args[1], args[9], args[3], args[5], args[6], args[7]),
                         strict=True):
        if like is not None:
            assert torch.equal(got, torch.zeros_like(like))


def test_bad_inputs_raise():
    case = Case("bad", torch.float32, 2, 5, 10, 16)
    args, _ = _inputs(case)
    bad = args[0].clone()
    bad[1, 2] = 10
    with pytest.raises(IndexError, match="input_ids contains 10"):
        ek.embedding_layernorm_forward(bad, *args[1:])
    args64 = tuple(f64(a) for a in args)
    with pytest.raises(TypeError, match="float64"):
        ek.embedding_layernorm_forward(*args64)
    h = 4097
    with pytest.raises(ValueError, match="up to 4096 features"):
        ek.embedding_layernorm_forward(args[0], torch.zeros(10, h), args[2], torch.zeros(8, h),
                                       None, None, torch.ones(h), torch.zeros(h), EPS)


# ----------------------------------------------------------------------------------------------
# Through the public op
# ----------------------------------------------------------------------------------------------

needs_triton_entry = pytest.mark.skipif(
    "triton" not in rosita_fast.ops.OPS["embedding_layernorm"],
    reason="rosita_fast/ops/embedding_layernorm.py has no 'triton' entry in its backend tables "
    "yet: the kernels are tested through their launchers above",
)


@pytest.mark.parametrize("rank", [None, 24], ids=["dense", "factorized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_op_autograd_matches_float64(dtype, rank):
    """``rosita_fast.ops.embedding_layernorm`` on the triton backend: forward and autograd
    backward (training forward + backward op with the kept statistics and projected rows) and
    the no-grad path, against the float64 reference; the padding rows get no gradient."""
    case = Case("public", dtype, 3, 13, 50, 40, rank=rank, padding_idx=1,
                position_padding_idx=0)
    args, grad = _inputs(case)
    floats = (1, 3, 5, 6, 7, 9)  # word, position, token type tables, ln_weight/bias, proj
    args = tuple(a.requires_grad_() if i in floats and a is not None else a
                 for i, a in enumerate(args))
    args64 = tuple(f64(a.detach()) if isinstance(a, torch.Tensor) else a for a in args)
    ref_out = reference_forward(*args64)
    ref = reference_backward(grad.double(), *args64)
    with rosita_fast.use_backend("triton"), la.forced_tiles(BLOCK, rows=4, programs=3), \
            poison_outputs():
        out = rosita_fast.ops.embedding_layernorm(*args)
        out.backward(grad)
        with torch.no_grad():
            out_nograd = rosita_fast.ops.embedding_layernorm(*args)
    assert out.dtype == dtype and out.shape == (3, 13, 40)
    assert torch.equal(out_nograd, out.detach())
    assert_close(out, ref_out, dtype, "out", k=40)
    names = ("d_word", "d_proj", "d_pos", "d_tt", "d_ln_weight", "d_ln_bias")
    for name, i, want in zip(names, (1, 9, 3, 5, 6, 7), ref, strict=True):
        if args[i] is None:
            continue
        assert args[i].grad.dtype == dtype
        assert_close(args[i].grad, want, dtype, name, k=40)
    assert (args[1].grad[1] == 0).all() and (args[3].grad[0] == 0).all()


# ----------------------------------------------------------------------------------------------
# Launch specs = what the launchers launch
# ----------------------------------------------------------------------------------------------


KERNELS = ("embedding_ln_fwd_kernel", "embedding_ln_bwd_kernel", "embedding_matmul_kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_launch_specs_are_what_the_launchers_launch(monkeypatch, dtype):
    """For contiguous aligned tables and ids whose sizes are multiples of 16 (dense and
    factorized tables, with no, two or three token types, kept or recomputed statistics), the
    JIT specialisation of every launch is one of the ``contig`` launch specs; ``generic`` specs
    specialise nothing."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda **kwargs: launches.append((self.kernel, kwargs))

    specs = ek.launch_specs()
    for name in KERNELS:
        monkeypatch.setattr(ek, name, Recorder(getattr(ek, name)))
    for rank, token_types, hidden in ((None, 2, 768), (128, 0, 256), (64, 3, 1024)):
        case = Case("spec", dtype, 2, 64, 96, hidden, rank=rank, token_types=token_types,
                    padding_idx=1)
        args, grad = _inputs(case)
        for kept in (True, False):
            launches.clear()
            # the GPU path (no upcast, table tiles); the recorder launches nothing
            out, mean, rstd, word = ek.embedding_layernorm_train(*args, upcast=False)
            stats = (torch.empty_like(mean), torch.empty_like(rstd)) if kept else (None, None)
            ek.embedding_layernorm_backward(grad, *args, *stats, upcast=False)
            assert len(launches) == (2 if rank is None else 6)
            for kernel, kwargs in launches:
                candidates = [s for s in specs if s.kernel is kernel
                              and s.name.split("[")[1].startswith(TL[dtype])
                              and "contig" in s.name]
                assert any(spec_matches_launch(s, kernel, kwargs)
                           for s in candidates), kernel.__name__
    generic = [s for s in specs if s.name.endswith(",generic]")]
    assert {s.kernel.__name__ for s in generic} == set(KERNELS)
    for spec in generic:
        assert set(spec.constexprs) == declared_constexprs(spec.kernel), spec.name
        assert all(attr == [] for attr in spec.attrs.values()), spec.name
    assert len(specs) <= 3 * 36, "keep the lowering test's compile time in check"

