"""``linear_act``: the dense linear layer with a fused activation, ``act(x @ weight^T + bias)``.

Everything about the op lives here: the plain-PyTorch ground truth, the input checks, the fake
functions, the backend tables (reference, C++ ``csrc/cpu/linear_act.cpp``) and the autograd
formula; also :func:`pack_linear_weight`, the oneDNN-prepacked weight the C++ backend of this op
and of ``linear_residual_layernorm`` can take.
"""

from __future__ import annotations

import math

import torch

from rosita_fast.activations import (
    ACTIVATIONS,
    activation_grad,
    apply_activation,
    check_activation,
)
from rosita_fast.backends import forced_backend, use_backend
from rosita_fast.ops._autocast import autocast_inputs
from rosita_fast.ops._registry import define_op, lazy, native

__all__ = ["linear_act", "pack_linear_weight", "reference_backward", "reference_forward"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Activations whose gradient needs the pre-activation z. ReLU's needs only its sign, which the
# output has (relu(z) > 0 exactly where z > 0): the backward is given the output instead.
_NEEDS_Z = frozenset({"gelu", "gelu_tanh"})

# ---- ground truth -------------------------------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 accumulate in fp32, like the kernels.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the C++ backend's products run in for inputs of ``dtype`` (and so the dtype of a
    packed weight): fp16 runs in fp32 on CPUs (no fp16 GEMM there), every other dtype in itself."""
    return torch.float32 if dtype == torch.float16 else dtype


def reference_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ weight^T + bias)`` in plain PyTorch (fp16/bf16 accumulate in fp32). ``packed`` is
    ignored (it is the C++ backend's form of ``weight``)."""
    x2d = _acc(x.reshape(-1, x.shape[-1]))
    z = x2d @ _acc(weight).t()
    if bias is not None:
        z = z + _acc(bias)
    return apply_activation(z, activation).to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def _reference_train(x, weight, bias, activation):
    # (output, z = x weight^T + bias as [rows, out_features] in the GEMM dtype)
    x2d = _acc(x.reshape(-1, x.shape[-1]))
    z = x2d @ _acc(weight).t()
    if bias is not None:
        z = z + _acc(bias)
    out = apply_activation(z, activation).to(x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0]), z.to(gemm_dtype(x.dtype))


def reference_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`reference_forward`, written out in the kernels'
    decomposition: ``dz = grad * act'(z)``, ``dx = dz @ weight``, ``dweight = dz^T @ x``,
    ``dbias = sum(dz)``. ``z`` is the forward's pre-activation (``[rows, out_features]``) if it
    was kept (for ReLU anything with its sign, e.g. the output); else it is recomputed."""
    n = weight.shape[0]
    x2d = _acc(x.reshape(-1, x.shape[-1]))
    g2d = _acc(grad.reshape(-1, n))
    w = _acc(weight)
    dz = g2d
    if activation != "none":
        if z is None:
            z = x2d @ w.t()
            if bias is not None:
                z = z + _acc(bias)
        dz = g2d * activation_grad(_acc(z.reshape(-1, n)), activation)
    dx = (dz @ w).to(x.dtype).view(x.shape)
    dweight = (dz.t() @ x2d).to(weight.dtype)
    dbias = dz.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


# ---- fakes --------------------------------------------------------------------------------------
# Shared by the public op and the per-backend native ops (whose activation is an int code: a fake
# only looks at shapes).


def _fake_forward(x, weight, bias, activation, packed=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _fake_train(x, weight, bias, activation):
    rows = math.prod(x.shape[:-1])
    z = x.new_empty((rows, weight.shape[0]), dtype=gemm_dtype(x.dtype))
    return _fake_forward(x, weight, bias, activation), z


def _fake_backward(grad, x, weight, bias, activation, z=None):
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


# ---- backends -----------------------------------------------------------------------------------


def _encode(x, weight, bias, activation, packed=None):
    return x, weight, bias, ACTIVATIONS[activation], packed


def _encode_train(x, weight, bias, activation):
    return x, weight, bias, ACTIVATIONS[activation]


def _encode_bwd(grad, x, weight, bias, activation, z=None):
    return grad, x, weight, bias, ACTIVATIONS[activation], z


_FWD = define_op(
    "linear_act",
    "(Tensor x, Tensor weight, Tensor? bias, str activation, Tensor? packed=None) -> Tensor",
    {
        "reference": reference_forward,
        "cpp": native("linear_act_cpp", _encode),
        "triton": lazy("rosita_fast.kernels.linear_act", "linear_act_forward"),
    },
    _fake_forward,
)

# The training forward: the output and z = x weight^T + bias ([rows, out_features] in the GEMM
# dtype: x's, fp32 for fp16, i.e. as the product left it), which the backward then uses for act'(z)
# instead of recomputing the GEMM. Used by linear_act while autograd records, for the activations
# whose gradient needs z (_NEEDS_Z).
_TRAIN = define_op(
    "linear_act_train",
    "(Tensor x, Tensor weight, Tensor? bias, str activation) -> (Tensor, Tensor)",
    {
        "reference": _reference_train,
        "cpp": native("linear_act_train_cpp", _encode_train),
        "triton": lazy("rosita_fast.kernels.linear_act", "linear_act_train"),
    },
    _fake_train,
    public=False,
)


def _bias_grad_as_tensor(grad, x, weight, bias, activation, z=None):
    # Custom ops cannot return None: an empty tensor stands for "no bias gradient".
    dx, dw, db = reference_backward(grad, x, weight, bias, activation, z)
    return dx, dw, db if db is not None else x.new_empty(0)


_BWD = define_op(
    "linear_act_backward",
    "(Tensor grad, Tensor x, Tensor weight, Tensor? bias, str activation, Tensor? z=None) "
    "-> (Tensor, Tensor, Tensor)",
    {
        "reference": _bias_grad_as_tensor,
        "cpp": native("linear_act_backward_cpp", _encode_bwd),
        "triton": lazy("rosita_fast.kernels.linear_act", "linear_act_backward"),
    },
    _fake_backward,
    public=False,
)


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation = inputs[:4]
    # The training op's output is (out, z): z is kept for the backward. The plain op keeps the
    # output for ReLU (its sign is z's) and nothing else: the backward then recomputes z.
    if isinstance(output, tuple):
        z = output[1]
        ctx.mark_non_differentiable(z)
        # The extra outputs are non-differentiable and never get a gradient: without this autograd
        # would materialize a zero tensor the size of each one before calling the backward.
        ctx.set_materialize_grads(False)
    else:
        z = output if activation == "relu" else None
    ctx.save_for_backward(x, weight, bias, z)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.has_z = z is not None
    ctx.n_inputs = len(inputs)
    # The backward may run on another thread, where a backend forced around the forward with
    # use_backend is not in effect: carry it over.
    ctx.backend = forced_backend()


def _backward(ctx, grad, *unused_grad_z):
    if grad is None:  # (grads are not materialized: see _setup_context)
        return (None,) * ctx.n_inputs
    x, weight, bias, z = ctx.saved_tensors
    args = (grad, x, weight, bias if ctx.has_bias else None, ctx.activation,
            z if ctx.has_z else None)
    if ctx.backend is not None and forced_backend() != ctx.backend:
        with use_backend(ctx.backend):
            dx, dw, db = _BWD(*args)
    else:
        dx, dw, db = _BWD(*args)
    return (dx, dw, db if ctx.has_bias else None) + (None,) * (ctx.n_inputs - 3)


_FWD.register_autograd(_backward, _setup_context)
_TRAIN.register_autograd(_backward, _setup_context)

# ---- packed weights -----------------------------------------------------------------------------


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether :func:`pack_linear_weight` packs a weight of ``dtype`` on this machine: the C++
    extension is built, torch has oneDNN, and oneDNN serves the GEMM dtype on this CPU (bf16
    needs AVX512-BF16/AMX or AVX512 support that many AMD and older Intel CPUs lack)."""
    from rosita_fast._extension import HAS_CPP

    if not HAS_CPP or not torch.backends.mkldnn.is_available():
        return False
    if dtype in (torch.float32, torch.float16):
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def pack_linear_weight(weight: torch.Tensor, batch_hint: int = 64) -> torch.Tensor | None:
    """The oneDNN-prepacked form of a ``[out_features, in_features]`` weight, for the ``packed``
    argument of :func:`linear_act` and ``linear_residual_layernorm``, or None where the C++
    backend cannot use one (no C++ extension, torch without oneDNN, not a CPU tensor, fp64, or a
    dtype oneDNN does not serve on this CPU).

    The packed tensor holds the weight in the GEMM dtype (fp32 for an fp16 weight: fp16 products
    run in fp32 on CPUs) in oneDNN's blocked layout, so a call skips the weight reorder (and the
    fp16 conversion). ``batch_hint``: the number of rows (tokens) the calls will have; any number
    of rows stays correct. It is a copy: repack after the weight changes. It is for inference only
    (a call that records autograd, or traced by ``torch.compile``, ignores it) and only the C++
    backend uses it (the reference ignores it).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("pack_linear_weight: weight must be a 2-D [out_features, in_features] "
                         "tensor")
    if not isinstance(batch_hint, int) or batch_hint < 1:
        raise ValueError(
            f"pack_linear_weight: batch_hint must be a positive int, got {batch_hint!r}"
        )
    if not weight.is_cpu or weight.numel() == 0 or not packing_supported(weight.dtype):
        return None
    with torch.no_grad():
        w = weight.detach().to(gemm_dtype(weight.dtype)).contiguous()
        return torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)


# ---- public entry point -------------------------------------------------------------------------


def _check(x, weight, bias, activation, packed) -> None:
    # The common, valid call is recognised with a handful of attribute reads (this runs on every
    # call of the no-grad fast path); anything else goes through the checks that explain.
    try:
        dtype = x.dtype
        valid = (
            weight.dtype is dtype and dtype in _SUPPORTED_DTYPES and activation in ACTIVATIONS
            and x.dim() >= 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and (bias is None or (bias.dtype is dtype and bias.dim() == 1
                                  and bias.shape[0] == weight.shape[0]))
            and (packed is None or (packed.is_mkldnn and packed.dtype is gemm_dtype(dtype)
                                    and packed.shape == weight.shape))
        )
        if valid:
            # is_cpu is a flag; comparing torch.device objects costs ~0.4 us each.
            if x.is_cpu:
                valid = weight.is_cpu and (bias is None or bias.is_cpu)
            else:
                valid = packed is None and weight.device == x.device and (
                    bias is None or bias.device == x.device
                )
    except (AttributeError, TypeError):
        valid = False
    if not valid:
        _explain(x, weight, bias, activation, packed)


def _explain(x, weight, bias, activation, packed) -> None:
    """Raise the error that says what is wrong with a call :func:`_check` did not accept."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear_act: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"linear_act: {name} has dtype {t.dtype}; supported: "
                f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}"
            )
    check_activation(activation)
    if x.dim() < 1:
        raise ValueError("linear_act: x must have at least one dimension [..., in_features]")
    if weight.dim() != 2:
        raise ValueError(
            f"linear_act: weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_act: x has {x.shape[-1]} features but weight is {tuple(weight.shape)} "
            "([out_features, in_features])"
        )
    out_f = weight.shape[0]
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"linear_act: bias must have shape ({out_f},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"linear_act: {name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"linear_act: {name} is on {t.device} but x is on {x.device}")
    check_packed(packed, weight, "linear_act")
    raise AssertionError("linear_act: a call failed the fast check but no explaining one")


def check_packed(packed, weight: torch.Tensor, op: str) -> None:
    """Raise the error that says why ``packed`` is not the packed form of ``weight``, if it is
    not (shared with ``linear_residual_layernorm``)."""
    if packed is None:
        return
    if not isinstance(packed, torch.Tensor) or not packed.is_mkldnn:
        raise TypeError(
            f"{op}: packed must be None or a weight packed by rosita_fast.ops.pack_linear_weight "
            f"(an MKLDNN tensor), got {type(packed).__name__}"
            + ("" if not isinstance(packed, torch.Tensor) else f" with layout {packed.layout}")
        )
    if not weight.is_cpu:
        raise ValueError(f"{op}: packed weights are for CPU calls; weight is on {weight.device}")
    expected = gemm_dtype(weight.dtype)
    if packed.dtype != expected or packed.shape != weight.shape:
        raise ValueError(
            f"{op}: packed is {packed.dtype} {tuple(packed.shape)}, not the packed form of the "
            f"{weight.dtype} {tuple(weight.shape)} weight ({expected} {tuple(weight.shape)}: "
            "rosita_fast.ops.pack_linear_weight(weight))"
        )


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense linear layer with a fused activation: ``act(x @ weight.T + bias)``.

    Args:
        x: input ``[..., in_features]`` (any leading dimensions, any strides).
        weight: ``[out_features, in_features]`` (``nn.Linear.weight``).
        bias: optional ``[out_features]``.
        activation: ``"none"``, ``"relu"``, ``"gelu"`` (erf form) or ``"gelu_tanh"``.
        packed: None, or ``pack_linear_weight(weight)``: the C++ backend's prepacked copy of
            ``weight``, an inference-only hint. The caller guarantees it is the current weight
            (only its shape and dtype are checked). Only the C++ backend uses it; the reference
            ignores it, and so does a call that records autograd, is traced by
            ``torch.compile``, or whose weight autocast casts.

    Returns ``[..., out_features]`` in ``x``'s dtype. fp16/bf16 accumulate in fp32. Under
    ``torch.autocast`` the floating inputs (fp64 excepted) are cast to the autocast dtype first,
    like ``torch.nn.functional.linear``.

    Backends (``rosita_fast.use_backend``): ``cpp`` (CPU default: one oneDNN GEMM with bias and
    activation in its epilogue, about twice torch's default fp32 GEMM on AMD CPUs; fp16 products
    run in fp32, fp64 ones in at::addmm; a single unpacked fp32 row goes to MKL's GEMV) and
    ``reference`` (plain PyTorch). Differentiable in ``x``, ``weight`` and ``bias``. While
    autograd records, the GELU forms also keep ``z = x @ weight.T + bias`` (the size of the
    output, in x's dtype; fp32 for fp16) for the backward, ReLU keeps its output, ``"none"`` keeps
    nothing.
    """
    if isinstance(x, torch.Tensor):
        cast = autocast_inputs(x, weight, bias)
        if cast[1] is not weight:
            packed = None  # autocast changed the weight: its packed copy is not of it
        x, weight, bias = cast
    if packed is not None and torch.compiler.is_compiling():
        packed = None  # an MKLDNN tensor has no fake (meta) form: traced graphs take the weight
    _check(x, weight, bias, activation, packed)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        if activation in _NEEDS_Z:
            return _TRAIN(x, weight, bias, activation)[0]
        return _FWD(x, weight, bias, activation)
    return _FWD.call(x, weight, bias, activation, packed)
