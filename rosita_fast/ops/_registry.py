"""What every rosita_fast op has in common, generated from one table per op.

An op module (``rosita_fast/ops/<op>.py``) declares its schema, fake (meta) function, input checks
and a table from backend name to implementation, and calls :func:`define_op`. This module then

- declares the ``torch.library`` custom op ``rosita_fast::<name>`` (its CPU/CUDA kernel picks the
  backend per call with :func:`rosita_fast.backends.select_backend`);
- registers the fake function for the op and for its per-backend C++/CUDA ops
  (``rosita_fast::<name>_cpp`` and ``_cuda``, declared in ``csrc/`` and wrapped by :func:`native`),
  so ``torch.compile`` and tracing see through every layer;
- provides the no-grad fast path (:meth:`KernelOp.call`) that runs the same backend without the
  custom-op layer's Python overhead when nothing needs a graph;
- records the op in :data:`REGISTRY`, from which ``rosita_fast.ops.OPS`` is built.

Adding an op touches only its own module (see docs/adding_an_op.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from rosita_fast.backends import BACKENDS, forced_backend, select_backend

#: Every op declared with :func:`define_op`, public and backward ops alike, by name.
REGISTRY: dict[str, KernelOp] = {}

Route = Callable[[str, tuple], str]


class native:  # noqa: N801 - used like a function in the backend tables
    """A backend implemented by a C++/CUDA op ``torch.ops.rosita_fast.<op_name>``.

    ``encode`` turns the Python op's arguments into the native op's (e.g. an activation name into
    its integer code). The native op's overload is resolved on first use and cached: attribute
    lookups on ``torch.ops`` cost microseconds per call.
    """

    def __init__(self, op_name: str, encode: Callable[..., tuple] | None = None) -> None:
        self.op_name = op_name
        self.encode = encode
        self._overload = None

    def exists(self) -> bool:
        """Whether the library that declares the native op is loaded."""
        return hasattr(torch.ops.rosita_fast, self.op_name)

    def __call__(self, *args):
        fn = self._overload
        if fn is None:
            fn = self._overload = getattr(torch.ops.rosita_fast, self.op_name).default
        return fn(*(self.encode(*args) if self.encode is not None else args))


class lazy:  # noqa: N801 - used like a function in the backend tables
    """A backend implemented by ``module:function``, imported on first use (Triton is heavy)."""

    def __init__(self, module: str, function: str) -> None:
        self.module, self.function = module, function
        self._fn = None

    def __call__(self, *args):
        fn = self._fn
        if fn is None:
            fn = self._fn = getattr(importlib.import_module(self.module), self.function)
        return fn(*args)


@dataclass
class KernelOp:
    """One declared op: its custom op, backend table and dispatch."""

    name: str
    impls: Mapping[str, Callable]
    fake: Callable
    custom_op: object
    route: Route | None = None
    public: bool = True
    _backends: tuple[str, ...] = field(default=())
    # Default backend per device type: fixed for the process (it depends on what loaded), so it is
    # resolved once instead of on every call.
    _defaults: dict[str, str] = field(default_factory=dict)

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends this op implements, in the order of ``rosita_fast.BACKENDS``."""
        return self._backends

    @property
    def reference(self) -> Callable:
        """The plain-PyTorch implementation (the ground truth every backend is tested against)."""
        return self.impls["reference"]

    def backend_for(self, args: tuple) -> str:
        """The backend one call with ``args`` runs on (forced by ``use_backend`` or the default)."""
        device = _device_of(args)
        if forced_backend() is None:
            backend = self._defaults.get(device.type)
            if backend is None:
                backend = select_backend(self.name, device, self._backends)
                self._defaults[device.type] = backend
        else:
            backend = select_backend(self.name, device, self._backends)
        if self.route is not None and device.type != "cpu":
            backend = self.route(backend, args)
        return backend

    def run(self, *args):
        """Run the op on the selected backend, below autograd (no graph is recorded)."""
        # The common call (nothing forced, CPU tensors) costs two attribute reads here: at batch 1
        # an op's whole kernel takes a few microseconds.
        first = args[0]
        if not isinstance(first, torch.Tensor):  # a Tensor[] first argument (hidden_mse_loss)
            first = first[0]
        if first.is_cpu and forced_backend() is None:
            backend = self._defaults.get("cpu") or self.backend_for(args)
        else:
            backend = self.backend_for(args)
        return self.impls[backend](*args)

    def __call__(self, *args):
        """Call the ``torch.library`` op (autograd, tracing and ``torch.compile`` see it)."""
        return self.custom_op(*args)

    def call(self, *args):
        """The op for a call that records no autograd graph: eagerly, the no-grad fast path.

        The fast path runs the same backend selection and kernels; it only skips the custom-op
        layer (several microseconds a call, which dominate at a few dozen tokens). Under
        ``torch.compile`` the custom op is called, so the graph sees it.
        """
        if torch.compiler.is_compiling():
            return self.custom_op(*args)
        return self.run(*args)

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """Attach the autograd formula to the custom op."""
        self.custom_op.register_autograd(backward, setup_context=setup_context)


def _device_of(args: Sequence) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    raise TypeError("an op needs at least one tensor argument")


def define_op(
    name: str,
    schema: str,
    impls: Mapping[str, Callable],
    fake: Callable,
    *,
    route: Route | None = None,
    public: bool = True,
) -> KernelOp:
    """Declare ``rosita_fast::<name>`` with schema ``schema`` and the backends in ``impls``.

    ``impls`` maps backend names (``reference`` is required) to callables taking the op's
    arguments; :class:`native` entries name the C++/CUDA ops whose fakes are registered here
    (whether a backend can run in this install is ``rosita_fast.available_backends``' business).
    ``route(backend, args)`` may send a call on a GPU that the default backend cannot serve to
    another one (a documented per-op rule; it must leave a backend forced with ``use_backend``
    alone; CPU calls are not routed). The first argument of every op is a tensor or a non-empty
    list of tensors.
    ``public`` ops are listed in ``rosita_fast.ops.OPS``; backward ops are declared with
    ``public=False``.
    """
    if name in REGISTRY:
        raise ValueError(f"rosita_fast op {name!r} is declared twice")
    unknown = set(impls) - set(BACKENDS)
    if unknown:
        raise ValueError(f"op {name!r}: unknown backends {sorted(unknown)}")
    if "reference" not in impls:
        raise ValueError(f"op {name!r} needs a 'reference' implementation (the ground truth)")

    for impl in impls.values():
        if isinstance(impl, native) and impl.exists():
            torch.library.register_fake(f"rosita_fast::{impl.op_name}")(fake)
    backends = tuple(b for b in BACKENDS if b in impls)

    op = KernelOp(name=name, impls=impls, fake=fake, custom_op=None, route=route, public=public,
                  _backends=backends)

    def dispatch(*args):
        return op.run(*args)

    custom = torch.library.custom_op(f"rosita_fast::{name}", dispatch, mutates_args=(),
                                     schema=schema)
    custom.register_fake(fake)
    op.custom_op = custom
    REGISTRY[name] = op
    return op


def public_ops() -> dict[str, tuple[str, ...]]:
    """Every public op and the backends it implements (``rosita_fast.ops.OPS``)."""
    return {name: op.backends for name, op in REGISTRY.items() if op.public}
