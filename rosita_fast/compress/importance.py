"""Importance of attention heads and FFN neurons, from the gradients of any loss.

Two estimators, both accumulated by hooks during ordinary backward passes, so a training loop
needs no extra calls: attach an :class:`ImportanceTracker`, train (any loss: task CE, KD, ...),
read :meth:`ImportanceTracker.scores`, and :meth:`~ImportanceTracker.reset` after pruning.

* ``"taylor"`` (ROSITA, method section 2): for each tracked weight ``W`` the tracker sums
  ``|dL/dW|`` over backward passes; the per-weight score is ``|W| * mean|g|`` with ``W`` read when
  the scores are requested. A head's score sums the per-weight scores of its columns in the
  attention-output projection; an FFN neuron's score sums its row of the FFN input projection and
  its column of the FFN output projection. Q/K/V and biases are not scored.
* ``"mask"``: a multiplicative mask of ones is inserted on each head's context vector and each
  FFN neuron's activation; its gradient ``g`` is summed over backward passes and the score is
  ``|E[g]|``. The masks are exactly 1, so the forward values do not change.

Neither estimator touches weights or optimizer state, nor switches train/eval mode: scores are
taken from the model in whatever state the caller runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..models.adapter import adapter_for

__all__ = ["ImportanceMethod", "ImportanceScores", "ImportanceTracker", "compute_importance"]

ImportanceMethod = Literal["taylor", "mask"]


@dataclass
class ImportanceScores:
    """Per-layer structure scores of one model shape (higher means more important).

    ``heads[l]`` has one entry per head of layer ``l`` and ``ffn[l]`` one per FFN neuron, indexed
    like the model's current heads and neurons. Scores are float32 on the CPU.
    """

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]
    num_batches: int
    method: str

    @property
    def num_layers(self) -> int:
        """Number of layers the scores cover."""
        return len(self.heads)

    def check_matches(self, heads: list[int], ffn: list[int]) -> None:
        """Raise ``ValueError`` unless the scores were taken on a model with these sizes."""
        got_heads = [len(h) for h in self.heads]
        got_ffn = [len(f) for f in self.ffn]
        if got_heads != list(heads) or got_ffn != list(ffn):
            raise ValueError(
                "importance scores do not match the model's shape (stale scores from before a "
                f"pruning step?): scores have heads {got_heads}, FFN {got_ffn}; the model has "
                f"heads {list(heads)}, FFN {list(ffn)}"
            )


class ImportanceTracker:
    """Accumulates head and FFN-neuron importance over the backward passes of a model.

    Example (any training loop)::

        tracker = ImportanceTracker(model)            # hooks attached
        for batch in loader:
            loss = loss_fn(model, batch)
            loss.backward()                           # tracker accumulates here
            optimizer.step(); optimizer.zero_grad()
        scores = tracker.scores()                     # ImportanceScores for prune_()
        tracker.detach()

    Each backward pass counts as one batch. With gradient accumulation over micro-batches each
    micro-batch counts, which only rescales the scores. Under a dynamic fp16 loss scale the raw
    gradients are scaled; prefer bf16 or fp32 when scores matter across steps.
    """

    def __init__(self, model: nn.Module, *, method: ImportanceMethod = "taylor") -> None:
        if method not in ("taylor", "mask"):
            raise ValueError(f"method must be 'taylor' or 'mask', got {method!r}")
        self.model = model
        self.method: ImportanceMethod = method
        self._adapter = adapter_for(model)
        self._handles: list[Any] = []
        self._sums: list[list[torch.Tensor]] = []
        self._counts: list[list[int]] = []
        self._masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.attach()

    # ---- lifecycle -------------------------------------------------------------------------

    def attach(self) -> None:
        """(Re)attach hooks to the model's current layers with fresh, zero accumulators."""
        self.detach()
        self._sums, self._counts, self._masks = [], [], []
        head_size = self._adapter.head_size(self.model.config)
        for layer in self._adapter.layer_list(self.model):
            o = self._adapter.attention_linears(layer)[3]
            ffn_in, ffn_out = self._adapter.ffn_linears(layer)
            if self.method == "taylor":
                self._track_weights([o.weight, ffn_in.weight, ffn_out.weight])
            else:
                self._insert_masks(o, ffn_out, head_size)

    def detach(self) -> None:
        """Remove every hook; accumulated values are kept until :meth:`attach` or :meth:`reset`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        """Forget everything accumulated and re-attach to the model's current shape.

        Call after pruning: pruned weights are new tensors, and ROSITA restarts accumulation
        after every pruning event.
        """
        self.attach()

    def __enter__(self) -> ImportanceTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def num_batches(self) -> int:
        """Backward passes accumulated so far (the smallest count over tracked tensors)."""
        return min((c for counts in self._counts for c in counts), default=0)

    # ---- hooks -----------------------------------------------------------------------------

    def _track_weights(self, weights: list[nn.Parameter]) -> None:
        sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
        counts = [0] * len(weights)
        self._sums.append(sums)
        self._counts.append(counts)
        for i, w in enumerate(weights):
            if w.requires_grad:  # frozen weights get no gradient: scores() then reports it
                self._handles.append(w.register_hook(self._abs_grad_hook(sums[i], counts, i)))

    @staticmethod
    def _abs_grad_hook(acc: torch.Tensor, counts: list[int], i: int) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            acc.add_(grad.detach().abs().float())
            counts[i] += 1

        return hook

    def _insert_masks(self, o: nn.Linear, ffn_out: nn.Linear, head_size: int) -> None:
        device = o.weight.device
        head_mask = torch.ones(o.in_features // head_size, device=device, requires_grad=True)
        ffn_mask = torch.ones(ffn_out.in_features, device=device, requires_grad=True)
        counts = [0, 0]
        self._masks.append((head_mask, ffn_mask))
        self._counts.append(counts)

        def mask_heads(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (x * head_mask.repeat_interleave(head_size).to(x.dtype), *args[1:])

        def mask_neurons(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (x * ffn_mask.to(x.dtype), *args[1:])

        def count(i: int) -> Callable:
            def hook(_grad: torch.Tensor) -> None:
                counts[i] += 1

            return hook

        self._handles += [
            o.register_forward_pre_hook(mask_heads),
            ffn_out.register_forward_pre_hook(mask_neurons),
            head_mask.register_hook(count(0)),
            ffn_mask.register_hook(count(1)),
        ]

    # ---- scores ----------------------------------------------------------------------------

    @torch.no_grad()
    def scores(self) -> ImportanceScores:
        """Return the scores accumulated since the last :meth:`attach` / :meth:`reset`.

        Raises:
            RuntimeError: no backward pass reached the tracked weights (frozen weights, or no
                training step since the last reset).
        """
        n = self.num_batches
        if n == 0:
            raise RuntimeError(
                "no gradients were accumulated: run at least one backward pass through the "
                "model (with its attention-output and FFN weights requiring grad) first"
            )
        heads, ffn = [], []
        if self.method == "taylor":
            head_size = self._adapter.head_size(self.model.config)
            for layer, (acc_o, acc_in, acc_out), counts in zip(
                self._adapter.layer_list(self.model), self._sums, self._counts, strict=True
            ):
                o = self._adapter.attention_linears(layer)[3]
                ffn_in, ffn_out = self._adapter.ffn_linears(layer)
                s_o = o.weight.abs().float() * acc_o / counts[0]
                heads.append(s_o.sum(0).view(-1, head_size).sum(1).cpu())
                s_in = (ffn_in.weight.abs().float() * acc_in).sum(1) / counts[1]
                s_out = (ffn_out.weight.abs().float() * acc_out).sum(0) / counts[2]
                ffn.append((s_in + s_out).cpu())
        else:
            for (head_mask, ffn_mask), counts in zip(self._masks, self._counts, strict=True):
                heads.append(_mean_abs(head_mask, counts[0]))
                ffn.append(_mean_abs(ffn_mask, counts[1]))
        return ImportanceScores(heads=heads, ffn=ffn, num_batches=n, method=self.method)


def _mean_abs(mask: torch.Tensor, count: int) -> torch.Tensor:
    if mask.grad is None or count == 0:
        return torch.zeros(mask.numel())
    return (mask.grad / count).abs().float().cpu()


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("the model returned no loss for this batch (no labels?); pass loss_fn")
    return loss


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


def compute_importance(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    *,
    method: ImportanceMethod = "taylor",
    max_batches: int | None = None,
) -> ImportanceScores:
    """Score heads and FFN neurons over ``batches`` without updating any weight.

    This is the one-step scoring pass (ROSITA path A): forward, backward, accumulate, discard the
    gradients. The model stays in the mode the caller set (ROSITA scores with dropout on, i.e.
    ``model.train()``). ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``; mapping
    batches are moved to the model's device. Existing ``.grad`` values are cleared.

    Raises:
        ValueError: ``method`` is unknown or a batch yields no loss.
        RuntimeError: no batch produced gradients for the tracked weights.
    """
    loss_fn = loss_fn or _default_loss
    device = next(model.parameters()).device
    with ImportanceTracker(model, method=method) as tracker:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            loss_fn(model, _to_device(batch, device)).backward()
            model.zero_grad(set_to_none=True)
        return tracker.scores()
