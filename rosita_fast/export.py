"""Export a sequence classifier to ONNX and run it with ONNX Runtime.

:func:`export_onnx` writes a Hugging Face sequence classifier (BERT, RoBERTa, MPNet and the
student classes of :mod:`rosita_fast.models`: per-layer heads and FFN sizes, a factorized word
embedding, MPNet's shared relative position bias) as one ONNX graph with the inputs
``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the model has segment
embeddings), all ``int64`` of shape ``(batch, sequence)`` with both axes dynamic, and the one
output ``logits`` of shape ``(batch, num_labels)``. :func:`onnx_session` opens such a file with
ONNX Runtime on a given number of threads, :func:`run_onnx` runs it on a batch of tensors (a
tokenizer's output, a collator's batch) and :func:`verify_onnx` compares it with torch.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter (torch's
default since 2.9; it needs ``onnxscript``). It captures the whole forward as a graph over
symbolic batch and sequence sizes and fails at export time where a shape would be baked in. The
legacy TorchScript exporter (``dynamo=False``) also produces correct graphs for these models
today and exports several times faster, but it is deprecated in torch 2.13 ("will be removed")
and works by tracing: any Python branch taken on the example tensors (transformers' mask code
triggers such tracer warnings) is silently frozen into the graph.

Example::

    from rosita_fast.export import export_onnx, onnx_session, run_onnx

    export_onnx(model, "student.onnx")
    session = onnx_session("student.onnx", threads=1)
    logits = run_onnx(session, tokenizer(["a fine film"], return_tensors="pt"))
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "ONNX_INPUTS",
    "OnnxExportError",
    "export_onnx",
    "onnx_input_names",
    "onnx_session",
    "run_onnx",
    "verify_onnx",
]

ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
"""The inputs an exported graph can have, in this order (``input_ids`` always)."""

# Example shapes of the export (torch.export specializes sizes 0 and 1, so both are >= 2) and of
# verify_onnx's default check (deliberately different, so a baked-in size shows up there).
_EXPORT_SHAPE = (2, 8)
_VERIFY_SHAPE = (3, 13)
# protobuf caps one ONNX file at 2 GiB; above this the weights go to a side file.
_EXTERNAL_DATA_BYTES = 1_800_000_000


class OnnxExportError(RuntimeError):
    """A model cannot be exported to ONNX, or its ONNX graph disagrees with torch."""


def onnx_input_names(model: nn.Module) -> list[str]:
    """The graph inputs :func:`export_onnx` gives ``model`` by default.

    ``input_ids`` and ``attention_mask``, plus ``token_type_ids`` when the model's forward takes
    them and its segment embedding has more than one row (``config.type_vocab_size > 1``): BERT
    yes; MPNet (no segment embedding) and RoBERTa checkpoints with ``type_vocab_size`` 1 no.
    """
    names = ["input_ids", "attention_mask"]
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    if takes_types and getattr(model.config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return names


class _LogitsOnly(nn.Module):
    """The classifier with a fixed tensor signature and one output, the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.model(**inputs).logits


def _sample_batch(model: nn.Module, names: Sequence[str], shape: tuple[int, int],
                  *, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Random ids of ``shape`` with the last row padded (a real, non-trivial attention mask)."""
    batch, seq = shape
    config = model.config
    vocab = int(config.vocab_size)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    padded = seq // 3
    ids[-1, seq - padded:] = pad
    mask[-1, seq - padded:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        types = torch.zeros_like(ids)
        types[:, seq // 2:] = 1
        out["token_type_ids"] = types * mask
    return {name: out[name].to(device) for name in names}


def _check_input_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in ONNX_INPUTS]
    if unknown or "input_ids" not in names or len(set(names)) != len(names):
        raise ValueError(f"input_names must be distinct names from {list(ONNX_INPUTS)} including "
                         f"'input_ids', got {names}")
    return [n for n in ONNX_INPUTS if n in names]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's own chatter (pytree deprecations, axis-name notes, skipped
    torchvision ops, opset-conversion notes); errors still raise, :func:`export_onnx` checks the
    opset it got and :func:`verify_onnx` the numbers."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _default_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` (a sequence classifier) to ``path`` as ONNX; return the path.

    Args:
        model: an in-memory Hugging Face sequence classifier whose forward returns ``logits``
            (``BertForSequenceClassification``, ``RositaMPNetForSequenceClassification``, ...).
            It is exported in eval mode on its own device and dtype; its training mode is
            restored afterwards and nothing else about it changes.
        path: the ``.onnx`` file to write (its folder is created; an existing file is replaced).
        opset: ONNX opset of the default domain; ``None`` is the exporter's choice (18 or newer,
            what ONNX Runtime 1.32 runs).
        input_names: the graph inputs, a subset of :data:`ONNX_INPUTS` with ``input_ids``
            (kept in that order); default :func:`onnx_input_names`. Pass the tokenizer's
            ``model_input_names`` so that a deployment feeds its output to ONNX Runtime as is.
        external_data: store the weights in a side file ``<path>.data`` next to the graph.
            ``None``: only when they exceed what one ONNX file may hold (~2 GiB).

    Every input is ``int64`` of shape ``(batch, sequence)``, both axes dynamic (named ``batch``
    and ``sequence``); the sequence is limited only by the model's position embeddings. The output
    ``logits`` is ``(batch, num_labels)`` in the model's dtype. A model swapped onto the fast
    modules (:class:`~rosita_fast.FastModulesConfig`) is exported as its stock equivalent (same
    class, config and weights; :func:`rosita_fast.fast_modules.stock_copy`), whose operators ONNX
    Runtime fuses by itself.

    Raises:
        OnnxExportError: the model has no ``logits`` output, or the exporter (or the
            ``onnxscript`` package it needs) is missing or fails.
        ValueError: bad ``input_names``.
    """
    from .fast_modules import is_fast, stock_copy

    if is_fast(model):
        model = stock_copy(model)
    path = Path(path)
    names = _check_input_names(input_names) if input_names is not None else onnx_input_names(model)
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's ONNX builder)
    except ImportError as exc:
        raise OnnxExportError(
            "exporting to ONNX needs the onnxscript package (pip install -r requirements.txt)"
        ) from exc
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    wrapper = _LogitsOnly(model)
    sample = _sample_batch(model, names, _EXPORT_SHAPE, device=device)
    if external_data is None:
        size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        external_data = size > _EXTERNAL_DATA_BYTES
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # One eager forward first: it checks the model is a classifier, and builds lazily
            # cached tensors (MPNet's per-layer bias-head index) outside the export trace.
            out = model(**sample)
        if getattr(out, "logits", None) is None:
            raise OnnxExportError(
                f"{type(model).__name__} returns no logits: export_onnx exports sequence "
                "classifiers (AutoModelForSequenceClassification)"
            )
        batch_dim = torch.export.Dim("batch")
        seq_dim = torch.export.Dim("sequence")
        path.parent.mkdir(parents=True, exist_ok=True)
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                wrapper,
                (),
                str(path),
                kwargs=sample,
                input_names=names,
                output_names=["logits"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={name: {0: batch_dim, 1: seq_dim} for name in names},
                external_data=external_data,
                optimize=True,
                verbose=False,
            )
    except torch.onnx.OnnxExporterError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise OnnxExportError(
            f"torch.onnx could not export {type(model).__name__}: {first.strip()}"
        ) from exc
    finally:
        model.train(was_training)
    if opset is not None and (written := _default_opset(path)) != opset:
        # The exporter writes its own opset and converts down with ONNX's version converter,
        # which cannot go below an operator's first version (LayerNormalization: 17); it then
        # keeps the unconverted graph and only logs it.
        path.unlink()
        Path(f"{path}.data").unlink(missing_ok=True)
        raise OnnxExportError(f"{type(model).__name__} cannot be written at opset {opset}: the "
                              f"exporter produced opset {written} and could not convert it")
    return path


def onnx_session(
    path: str | Path,
    *,
    threads: int | None = 1,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session of the file ``path`` on ``threads`` intra-op threads.

    ``threads`` sets ``intra_op_num_threads`` (the threads one operator runs on, the counterpart
    of ``torch.set_num_threads``); ``None`` leaves ONNX Runtime's default (one per physical
    core). Operators run one after the other (sequential execution, one inter-op thread) with all
    graph optimizations on, so a benchmark compares like with like against torch.
    """
    import onnxruntime as ort

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def _as_int64(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value), dtype=np.int64)


def run_onnx(
    session: onnxruntime.InferenceSession, batch: Mapping[str, Any]
) -> torch.Tensor:
    """Run ``session`` on ``batch`` and return its first output (the logits) as a CPU tensor.

    ``batch`` maps input names to tensors or arrays (a tokenizer's ``BatchEncoding``, a collator's
    dict); keys the graph does not take (``labels``, ...) are ignored. A missing
    ``attention_mask`` is all ones and a missing ``token_type_ids`` all zeros, as in the torch
    model; ``input_ids`` is required.
    """
    if "input_ids" not in batch:
        raise KeyError("the batch has no 'input_ids'")
    ids = _as_int64(batch["input_ids"])
    feed = {}
    for graph_input in session.get_inputs():
        name = graph_input.name
        if name in batch and batch[name] is not None:
            feed[name] = _as_int64(batch[name])
        elif name == "attention_mask":
            feed[name] = np.ones_like(ids)
        elif name == "token_type_ids":
            feed[name] = np.zeros_like(ids)
        else:
            raise KeyError(f"the batch has no {name!r}, an input of the ONNX model")
    return torch.from_numpy(session.run(None, feed)[0])


def verify_onnx(
    model: nn.Module,
    onnx_model: str | Path | onnxruntime.InferenceSession,
    batch: Mapping[str, torch.Tensor] | None = None,
    *,
    threads: int | None = 1,
) -> float:
    """Largest difference between ONNX Runtime's and torch's logits, relative to torch's largest.

    ``onnx_model`` is a file (opened with :func:`onnx_session` on ``threads``) or a session.
    ``batch`` defaults to random ids of another shape than the export's, last row padded. fp32
    exports agree to about 1e-6.
    """
    session = onnx_model if not isinstance(onnx_model, (str, Path)) else onnx_session(
        onnx_model, threads=threads)
    names = [graph_input.name for graph_input in session.get_inputs()]
    if batch is None:
        batch = _sample_batch(model, names, _VERIFY_SHAPE)
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # Only what the graph takes: run_onnx ignores the rest, so torch must too.
            inputs = {k: torch.as_tensor(batch[k]).to(device) for k in names if k in batch}
            expected = model(**inputs).logits.float().cpu()
    finally:
        model.train(was_training)
    got = run_onnx(session, batch).float()
    if got.shape != expected.shape:
        raise OnnxExportError(f"ONNX logits have shape {tuple(got.shape)}, torch's "
                              f"{tuple(expected.shape)}")
    scale = expected.abs().max().clamp_min(1e-12)
    return float((got - expected).abs().max() / scale)
