"""``embedding_layernorm``: the fused BERT embedding layer
``LayerNorm(word[input_ids] + token_type[token_type_ids] + position[position_ids])``.

The word lookup is either a dense ``[V, hidden]`` table or a factorized one (``[V, E]`` rows
projected by ``word_proj`` ``[hidden, E]``, :class:`rosita_fast.models.FactorizedEmbedding`).
Everything about the op lives here: the plain-PyTorch ground truth, the input checks, the fake
functions, the backend tables (reference, C++ ``csrc/cpu/embedding_layernorm.cpp``) and the
autograd formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rosita_fast.backends import forced_backend, use_backend
from rosita_fast.ops._registry import define_op, lazy, native

__all__ = ["embedding_layernorm", "reference_backward", "reference_forward"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ID_DTYPES = (torch.int64, torch.int32)

# ---- ground truth -------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 accumulate in fp32, like the kernels.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_id_range(name: str, ids: torch.Tensor, rows: int) -> None:
    # One min/max per call (the tensors are small next to the tables).
    if ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= rows:
        bad = lo if lo < 0 else hi
        raise IndexError(
            f"embedding_layernorm: {name} contains {bad}, out of range for a table of {rows} rows"
        )


def _check_id_ranges(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                     token_type_weight) -> None:
    _check_id_range("input_ids", input_ids, word_weight.shape[0])
    _check_id_range("position_ids", position_ids, position_weight.shape[0])
    if token_type_ids is not None:
        _check_id_range("token_type_ids", token_type_ids, token_type_weight.shape[0])


def reference_forward(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_ids: torch.Tensor,
    position_weight: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    token_type_weight: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    word_proj: torch.Tensor | None = None,
    padding_idx: int | None = None,
    position_padding_idx: int | None = None,
) -> torch.Tensor:
    """``LayerNorm(word + token_type + position)`` in plain PyTorch (fp16/bf16 accumulate in
    fp32). Differentiable like the eager modules: the ``padding_idx`` rows get no gradient."""
    return _reference_train(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                            token_type_weight, ln_weight, ln_bias, eps, word_proj, padding_idx,
                            position_padding_idx)[0]


def _reference_train(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                     token_type_weight, ln_weight, ln_bias, eps, word_proj=None, padding_idx=None,
                     position_padding_idx=None):
    # (out [B, L, H], mean [B, L], rstd [B, L], word rows [B, L, H] (factorized) or [0]), the
    # statistics and word rows in the accumulation dtype.
    _check_id_ranges(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                     token_type_weight)
    acc = _acc_dtype(word_weight.dtype)
    b, length = input_ids.shape
    # Gather first, then widen: the tables are large.
    word = F.embedding(input_ids, word_weight, padding_idx=padding_idx).to(acc)
    if word_proj is not None:
        word = word @ word_proj.to(acc).t()
    x = word
    if token_type_weight is not None:
        x = x + F.embedding(token_type_ids.expand(b, length), token_type_weight).to(acc)
    x = x + F.embedding(position_ids.expand(b, length), position_weight,
                        padding_idx=position_padding_idx).to(acc)
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    out = (xc * rstd * ln_weight.to(acc) + ln_bias.to(acc)).to(word_weight.dtype)
    rows = word if word_proj is not None else x.new_empty(0)
    return out, mean.squeeze(-1), rstd.squeeze(-1), rows


def _table_grad(src: torch.Tensor, ids: torch.Tensor, table: torch.Tensor,
                padding: int | None) -> torch.Tensor:
    # sum of the rows of src into the rows of a zero table, the padding row left at zero.
    grad = torch.zeros(table.shape, dtype=src.dtype, device=src.device)
    grad.index_add_(0, ids, src)
    if padding is not None:
        grad[padding] = 0
    return grad.to(table.dtype)


def reference_backward(
    grad: torch.Tensor,
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_ids: torch.Tensor,
    position_weight: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    token_type_weight: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    word_proj: torch.Tensor | None = None,
    padding_idx: int | None = None,
    position_padding_idx: int | None = None,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    word: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor,
           torch.Tensor]:
    """``(d_word_weight, d_word_proj, d_position_weight, d_token_type_weight, d_ln_weight,
    d_ln_bias)`` of :func:`reference_forward`, written out in the kernels' decomposition: the
    LayerNorm backward per row (``dx``), then the rows of ``dx`` summed into the tables (through
    ``dx @ word_proj`` for a factorized word table) with the padding rows left at zero, and
    ``d_word_proj = dx^T @ word_weight[input_ids]``. ``mean``/``rstd`` ([B, L]) and ``word``
    (the projected word rows, [B, L, hidden]) are the training forward's, if kept; else they
    are recomputed. Tests compare it, like every backend, with float64 autograd."""
    acc = _acc_dtype(word_weight.dtype)
    b, length = input_ids.shape
    n, h = b * length, ln_weight.shape[0]
    ids = input_ids.reshape(n).long()
    pos = position_ids.expand(b, length).reshape(n).long()
    if word is None or word.numel() == 0:
        w = word_weight[ids].to(acc)
        if word_proj is not None:
            w = w @ word_proj.to(acc).t()
    else:
        w = word.reshape(n, h).to(acc)
    x = w
    if token_type_weight is not None:
        tt = token_type_ids.expand(b, length).reshape(n).long()
        x = x + token_type_weight[tt].to(acc)
    x = x + position_weight[pos].to(acc)
    if mean is None or rstd is None:
        mu = x.mean(-1)
        xc = x - mu[:, None]
        rs = torch.rsqrt((xc * xc).mean(-1) + eps)
    else:
        mu, rs = mean.reshape(n).to(acc), rstd.reshape(n).to(acc)
    xhat = (x - mu[:, None]) * rs[:, None]
    dy = grad.reshape(n, h).to(acc)
    g = dy * ln_weight.to(acc)
    dx = rs[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    d_gamma = (dy * xhat).sum(0).to(ln_weight.dtype)
    d_beta = dy.sum(0).to(ln_bias.dtype)
    d_pos = _table_grad(dx, pos, position_weight, position_padding_idx)
    d_tt = (_table_grad(dx, tt, token_type_weight, None)
            if token_type_weight is not None else None)
    d_proj = None
    if word_proj is not None:
        d_proj = (dx.t() @ word_weight[ids].to(acc)).to(word_proj.dtype)
        d_word = _table_grad(dx @ word_proj.to(acc), ids, word_weight, padding_idx)
    else:
        d_word = _table_grad(dx, ids, word_weight, padding_idx)
    return d_word, d_proj, d_pos, d_tt, d_gamma, d_beta


# ---- fakes --------------------------------------------------------------------------------------
# Shared by the public op and the per-backend native ops (same arguments): shapes only.


def _fake_forward(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                  token_type_weight, ln_weight, ln_bias, eps, word_proj=None, padding_idx=None,
                  position_padding_idx=None):
    return word_weight.new_empty((*input_ids.shape, ln_weight.shape[0]))


def _fake_train(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                token_type_weight, ln_weight, ln_bias, eps, word_proj=None, padding_idx=None,
                position_padding_idx=None):
    acc = _acc_dtype(word_weight.dtype)
    out = _fake_forward(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                        token_type_weight, ln_weight, ln_bias, eps)
    rows_shape = out.shape if word_proj is not None else (0,)
    return (out, word_weight.new_empty(input_ids.shape, dtype=acc),
            word_weight.new_empty(input_ids.shape, dtype=acc),
            word_weight.new_empty(rows_shape, dtype=acc))


def _fake_backward(grad, input_ids, word_weight, position_ids, position_weight, token_type_ids,
                   token_type_weight, ln_weight, ln_bias, eps, word_proj=None, padding_idx=None,
                   position_padding_idx=None, mean=None, rstd=None, word=None):
    return (
        word_weight.new_empty(word_weight.shape),
        word_proj.new_empty(word_proj.shape) if word_proj is not None else word_weight.new_empty(0),
        position_weight.new_empty(position_weight.shape),
        token_type_weight.new_empty(token_type_weight.shape)
        if token_type_weight is not None else word_weight.new_empty(0),
        ln_weight.new_empty(ln_weight.shape),
        ln_bias.new_empty(ln_bias.shape),
    )


# ---- backends -----------------------------------------------------------------------------------

_ARGS = (
    "Tensor input_ids, Tensor word_weight, Tensor position_ids, Tensor position_weight, "
    "Tensor? token_type_ids, Tensor? token_type_weight, Tensor ln_weight, Tensor ln_bias, "
    "float eps, Tensor? word_proj=None, int? padding_idx=None, int? position_padding_idx=None"
)

_FWD = define_op(
    "embedding_layernorm",
    f"({_ARGS}) -> Tensor",
    {
        "reference": reference_forward,
        "cpp": native("embedding_layernorm_cpp"),
        "triton": lazy("rosita_fast.kernels.embedding_layernorm", "embedding_layernorm_forward"),
    },
    _fake_forward,
)

# The training forward: the output, the per-row LayerNorm statistics (mean, rstd: [B, L], fp32
# for fp16/bf16) and, for a factorized word table, the projected word rows ([B, L, hidden]), which
# the backward then reuses instead of recomputing the projection GEMM. Used by
# embedding_layernorm when autograd records.
_TRAIN = define_op(
    "embedding_layernorm_train",
    f"({_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)",
    {
        "reference": _reference_train,
        "cpp": native("embedding_layernorm_train_cpp"),
        "triton": lazy("rosita_fast.kernels.embedding_layernorm", "embedding_layernorm_train"),
    },
    _fake_train,
    public=False,
)


def _missing_grads_as_tensors(backward):
    # Custom ops cannot return None: an empty tensor stands for "no such gradient".
    def run(*args):
        d_word, d_proj, d_pos, d_tt, d_gamma, d_beta = backward(*args)
        # (two distinct empties: outputs of a custom op must not alias each other)
        return (d_word, d_proj if d_proj is not None else args[2].new_empty(0), d_pos,
                d_tt if d_tt is not None else args[2].new_empty(0), d_gamma, d_beta)

    return run


_BWD = define_op(
    "embedding_layernorm_backward",
    f"(Tensor grad, {_ARGS}, Tensor? mean=None, Tensor? rstd=None, Tensor? word=None) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    {
        "reference": _missing_grads_as_tensors(reference_backward),
        "cpp": native("embedding_layernorm_backward_cpp"),
        "triton": lazy("rosita_fast.kernels.embedding_layernorm", "embedding_layernorm_backward"),
    },
    _fake_backward,
    public=False,
)


def _setup_context(ctx, inputs, output):
    (input_ids, word_weight, position_ids, position_weight, token_type_ids, token_type_weight,
     ln_weight, ln_bias, eps, word_proj, padding_idx, position_padding_idx) = inputs
    # The training op's output is (out, mean, rstd, word): kept for the backward; the plain op
    # keeps none (the backward recomputes them).
    kept = output[1:] if isinstance(output, tuple) else (None, None, None)
    if isinstance(output, tuple):
        # The extra outputs are non-differentiable and never get a gradient: without this autograd
        # would materialize a zero tensor the size of each one before calling the backward.
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
    mean, rstd, word = kept
    ctx.save_for_backward(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                          token_type_weight, ln_weight, ln_bias, word_proj, mean, rstd, word)
    ctx.eps = eps
    ctx.padding = (padding_idx, position_padding_idx)
    ctx.has = (token_type_weight is not None, word_proj is not None, mean is not None,
               word is not None and word_proj is not None)
    if mean is not None:
        ctx.mark_non_differentiable(mean, rstd, word)
    # The backward may run on another thread (CUDA's autograd device threads), where a backend
    # forced around the forward with use_backend is not in effect: carry it over.
    ctx.backend = forced_backend()


def _backward(ctx, grad, *unused_grads_of_kept):
    if grad is None:  # (grads are not materialized: see _setup_context)
        return (None,) * 12
    (input_ids, word_weight, position_ids, position_weight, token_type_ids, token_type_weight,
     ln_weight, ln_bias, word_proj, mean, rstd, word) = ctx.saved_tensors
    has_tt, has_proj, has_stats, has_word = ctx.has
    args = (grad, input_ids, word_weight, position_ids, position_weight,
            token_type_ids if has_tt else None, token_type_weight if has_tt else None,
            ln_weight, ln_bias, ctx.eps, word_proj if has_proj else None, *ctx.padding,
            mean if has_stats else None, rstd if has_stats else None,
            word if has_word else None)
    if ctx.backend is not None and forced_backend() != ctx.backend:
        with use_backend(ctx.backend):
            d_word, d_proj, d_pos, d_tt, d_gamma, d_beta = _BWD(*args)
    else:
        d_word, d_proj, d_pos, d_tt, d_gamma, d_beta = _BWD(*args)
    return (None, d_word, None, d_pos, None, d_tt if has_tt else None, d_gamma, d_beta, None,
            d_proj if has_proj else None, None, None)


_FWD.register_autograd(_backward, _setup_context)
_TRAIN.register_autograd(_backward, _setup_context)

# ---- public entry point -------------------------------------------------------------------------


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(input_ids, word_weight, position_ids, position_weight, token_type_ids,
           token_type_weight, ln_weight, ln_bias, eps, word_proj, padding_idx,
           position_padding_idx) -> None:
    # The common, valid call is recognised with a handful of attribute reads (this runs on every
    # call of the no-grad fast path); anything else goes through the checks that explain.
    try:
        dtype = word_weight.dtype
        hidden = ln_weight.shape[0]
        b, length = input_ids.shape
        valid = (
            dtype in _SUPPORTED_DTYPES and input_ids.dtype in _ID_DTYPES
            and position_ids.dtype in _ID_DTYPES and word_weight.dim() == 2
            and position_weight.dtype is dtype and ln_weight.dtype is dtype
            and ln_bias.dtype is dtype and ln_weight.dim() == 1 and hidden > 0
            and ln_bias.shape == ln_weight.shape
            and position_weight.dim() == 2 and position_weight.shape[1] == hidden
            and position_ids.dim() == 2 and position_ids.shape[1] == length
            and position_ids.shape[0] in (1, b)
            and word_weight.shape[1] > 0
            and (word_weight.shape[1] == hidden if word_proj is None else (
                word_proj.dtype is dtype and word_proj.dim() == 2
                and word_proj.shape[0] == hidden and word_proj.shape[1] == word_weight.shape[1]))
            and ((token_type_ids is None and token_type_weight is None) or (
                token_type_ids is not None and token_type_weight is not None
                and token_type_ids.dtype in _ID_DTYPES and token_type_ids.dim() == 2
                and token_type_ids.shape[1] == length and token_type_ids.shape[0] in (1, b)
                and token_type_weight.dtype is dtype and token_type_weight.dim() == 2
                and token_type_weight.shape[1] == hidden))
            and isinstance(eps, float) and eps >= 0.0
            and (padding_idx is None or (_is_index(padding_idx)
                                         and -word_weight.shape[0] <= padding_idx
                                         < word_weight.shape[0]))
            and (position_padding_idx is None or (
                _is_index(position_padding_idx)
                and -position_weight.shape[0] <= position_padding_idx < position_weight.shape[0]))
        )
        if valid:
            tensors = (input_ids, word_weight, position_ids, position_weight, token_type_ids,
                       token_type_weight, ln_weight, ln_bias, word_proj)
            # is_cpu is a flag; comparing torch.device objects costs ~0.4 us each.
            if input_ids.is_cpu:
                valid = all(t is None or t.is_cpu for t in tensors)
            else:
                valid = all(t is None or t.device == input_ids.device for t in tensors)
    except (AttributeError, TypeError, ValueError):
        valid = False
    if not valid:
        _explain(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                 token_type_weight, ln_weight, ln_bias, eps, word_proj, padding_idx,
                 position_padding_idx)


def _explain(input_ids, word_weight, position_ids, position_weight, token_type_ids,
             token_type_weight, ln_weight, ln_bias, eps, word_proj, padding_idx,
             position_padding_idx) -> None:
    """Raise the error that says what is wrong with a call :func:`_check` did not accept."""
    ids = (("input_ids", input_ids), ("position_ids", position_ids),
           ("token_type_ids", token_type_ids))
    floats = (("word_weight", word_weight), ("position_weight", position_weight),
              ("token_type_weight", token_type_weight), ("ln_weight", ln_weight),
              ("ln_bias", ln_bias), ("word_proj", word_proj))
    optional = ("token_type_ids", "token_type_weight", "word_proj")
    p = "embedding_layernorm:"
    for name, t in ids + floats:
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{p} {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in ids:
        if t is not None and t.dtype not in _ID_DTYPES:
            raise TypeError(f"{p} {name} has dtype {t.dtype}; expected torch.int64 or torch.int32")
    for name, t in floats:
        if t is not None and t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"{p} {name} has dtype {t.dtype}; supported: "
                f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}"
            )
    for name, t in floats[1:]:
        if t is not None and t.dtype != word_weight.dtype:
            raise TypeError(f"{p} {name} has dtype {t.dtype} but word_weight has "
                            f"{word_weight.dtype}")
    if (token_type_ids is None) != (token_type_weight is None):
        raise ValueError(f"{p} token_type_ids and token_type_weight must both be given or both "
                         "be None")
    if input_ids.dim() != 2:
        raise ValueError(f"{p} input_ids must be 2-D [batch, length], got "
                         f"{tuple(input_ids.shape)}")
    b, length = input_ids.shape
    if ln_weight.dim() != 1 or ln_weight.shape[0] == 0:
        raise ValueError(f"{p} ln_weight must be 1-D [hidden] with hidden > 0, got "
                         f"{tuple(ln_weight.shape)}")
    hidden = ln_weight.shape[0]
    if ln_bias.shape != ln_weight.shape:
        raise ValueError(f"{p} ln_bias must have shape ({hidden},), got {tuple(ln_bias.shape)}")
    if word_weight.dim() != 2 or word_weight.shape[1] == 0:
        raise ValueError(f"{p} word_weight must be 2-D [vocab, dim] with dim > 0, got "
                         f"{tuple(word_weight.shape)}")
    if word_proj is None:
        if word_weight.shape[1] != hidden:
            raise ValueError(f"{p} word_weight is {tuple(word_weight.shape)} but hidden is "
                             f"{hidden} (ln_weight); without word_proj it must be [vocab, hidden]")
    elif word_proj.dim() != 2 or tuple(word_proj.shape) != (hidden, word_weight.shape[1]):
        raise ValueError(f"{p} word_proj must be [hidden, rank] = "
                         f"{(hidden, word_weight.shape[1])} for word_weight "
                         f"{tuple(word_weight.shape)}, got {tuple(word_proj.shape)}")
    for name, t, w in (("position", position_ids, position_weight),
                       ("token_type", token_type_ids, token_type_weight)):
        if t is None:
            continue
        if t.dim() != 2 or t.shape[1] != length or t.shape[0] not in (1, b):
            raise ValueError(f"{p} {name}_ids must be [batch, length] or [1, length] = "
                             f"{(b, length)} or {(1, length)}, got {tuple(t.shape)}")
        if w.dim() != 2 or w.shape[1] != hidden:
            raise ValueError(f"{p} {name}_weight must be [rows, hidden={hidden}], got "
                             f"{tuple(w.shape)}")
    if not isinstance(eps, float) or not eps >= 0.0:
        raise ValueError(f"{p} eps must be a non-negative float, got {eps!r}")
    for name, idx, rows in (("padding_idx", padding_idx, word_weight.shape[0]),
                            ("position_padding_idx", position_padding_idx,
                             position_weight.shape[0])):
        if idx is None:
            continue
        if not _is_index(idx):
            raise TypeError(f"{p} {name} must be an int or None, got {type(idx).__name__}")
        if not -rows <= idx < rows:
            raise ValueError(f"{p} {name} {idx} is out of range for a table of {rows} rows")
    for name, t in ids + floats:
        if t is not None and t.device != input_ids.device:
            raise ValueError(f"{p} {name} is on {t.device} but input_ids is on "
                             f"{input_ids.device}")
    raise AssertionError(f"{p} a call failed the fast check but no explaining one")


def embedding_layernorm(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_ids: torch.Tensor,
    position_weight: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    token_type_weight: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    word_proj: torch.Tensor | None = None,
    padding_idx: int | None = None,
    position_padding_idx: int | None = None,
) -> torch.Tensor:
    """Fused BERT embedding: ``LayerNorm(word + token_type + position)`` with the LN affine.

    ``word`` is ``word_weight[input_ids]`` (dense table ``[V, hidden]``) or, with ``word_proj``
    ``[hidden, E]`` (an ``nn.Linear(E, hidden, bias=False).weight``),
    ``word_weight[input_ids] @ word_proj.T`` (factorized table ``[V, E]``).

    Args:
        input_ids: ``[B, L]`` int64 (or int32).
        word_weight: ``[V, hidden]``, or ``[V, E]`` with ``word_proj``.
        position_ids: ``[B, L]`` or ``[1, L]`` (broadcast over the batch), int64/int32.
        position_weight: ``[P, hidden]``.
        token_type_ids, token_type_weight: ``[B, L]``/``[1, L]`` and ``[T, hidden]``, or both
            None (MPNet has no token types).
        ln_weight, ln_bias: ``[hidden]``; ``eps``: the LayerNorm epsilon.
        word_proj: ``[hidden, E]`` for a factorized word table, or None.
        padding_idx: the row of ``word_weight`` that receives no gradient (as
            ``nn.Embedding(padding_idx=...)``); ``position_padding_idx`` the same for
            ``position_weight`` (RoBERTa, MPNet).

    Returns ``[B, L, hidden]`` in the weights' dtype (fp32, fp16, bf16 or fp64; fp16/bf16
    accumulate in fp32). Ids outside their table raise ``IndexError`` naming the value. The
    summation order is HF's: ``(word + token_type) + position``. Autocast leaves the op alone,
    like ``F.embedding`` and an fp32 ``F.layer_norm`` under CPU autocast (the output keeps the
    weights' dtype, as the eager HF embedding modules' does). Dropout is not part of the op.

    Backends (``rosita_fast.use_backend``): ``cpp`` (CPU default: gather, adds and LayerNorm in
    one pass over each token's row, parallel over tokens; a factorized table first projects the
    gathered ``[B*L, E]`` rows with one GEMM) and ``reference`` (plain PyTorch). Differentiable in
    every floating input (dense gradients). While autograd records, the forward also keeps the
    per-row mean and rstd and, factorized, the projected word rows, so the backward neither
    recomputes the statistics nor the projection.
    """
    # Python ints (eps=0) and numpy floats are floats here; the schema takes a float.
    if not isinstance(eps, float) and isinstance(eps, (int, float)) and not isinstance(eps, bool):
        eps = float(eps)
    args = (input_ids, word_weight, position_ids, position_weight, token_type_ids,
            token_type_weight, ln_weight, ln_bias, eps, word_proj, padding_idx,
            position_padding_idx)
    _check(*args)
    needs_grad = torch.is_grad_enabled() and (
        word_weight.requires_grad or position_weight.requires_grad or ln_weight.requires_grad
        or ln_bias.requires_grad
        or (token_type_weight is not None and token_type_weight.requires_grad)
        or (word_proj is not None and word_proj.requires_grad)
    )
    if needs_grad:
        return _TRAIN(*args)[0]
    return _FWD.call(*args)
