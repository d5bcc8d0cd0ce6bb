"""Importance of attention heads and FFN neurons, from the gradients of any loss.

Two estimators; by default both accumulate through hooks during ordinary backward passes, so a
training loop needs no extra calls: attach an :class:`ImportanceTracker`, train (any loss: task
CE, KD, ...), read :meth:`ImportanceTracker.scores`, and :meth:`~ImportanceTracker.reset` after
pruning.

* ``"taylor"`` (ROSITA, method section 2): for each tracked weight ``W`` the tracker sums
  ``|dL/dW|`` over backward passes; the per-weight score is ``|W| * mean|g|`` with ``W`` read when
  the scores are requested. A head's score sums the per-weight scores of its columns in the
  attention-output projection; an FFN neuron's score sums its row of the FFN input projection and
  its column of the FFN output projection. Q/K/V and biases are not scored.
* ``"mask"``: a multiplicative mask of ones is inserted on each head's context vector and each
  FFN neuron's activation; its gradient ``g`` is summed over backward passes and the score is
  ``|E[g]|``. The masks are exactly 1, so the forward values do not change.

Where the gradients come from (``source``):

* ``"hooks"`` (default): gradient hooks see every backward pass as it happens. Under
  ``DistributedDataParallel`` that is each rank's *local* gradient, before DDP averages it.
* ``"grads"``: no hooks; the loop calls :meth:`ImportanceTracker.accumulate_from_grads` once per
  optimizer step, after ``backward()`` and before ``optimizer.step()``, and the tracker reads the
  weights' ``.grad``. Under DDP that is the gradient already averaged over ranks, i.e. the
  gradient of the global batch, so every rank accumulates the same values and a run on ``N``
  processes scores exactly like one process on the same global batches (up to float summation
  order). The mask estimator needs no masks in this mode: at mask = 1 the gradient of a mask on
  the input of a linear layer ``y = W x + b`` is ``sum_i W_ij * dL/dW_ij`` over the column ``j``
  it scales, which the tracker computes from ``W`` and ``.grad``.

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

__all__ = [
    "ImportanceMethod",
    "ImportanceScores",
    "ImportanceSource",
    "ImportanceTracker",
    "compute_importance",
]

ImportanceMethod = Literal["taylor", "mask"]
ImportanceSource = Literal["hooks", "grads"]


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

    With ``source="grads"`` the loop accumulates explicitly instead (exact under DDP, see the
    module docstring)::

        tracker = ImportanceTracker(model, source="grads")
        for batch in loader:
            loss_fn(ddp_model, batch).backward()      # DDP averages .grad over ranks
            tracker.accumulate_from_grads()           # before the step changes the weights
            optimizer.step(); optimizer.zero_grad()

    With hooks each backward pass counts as one batch; with gradient accumulation over
    micro-batches each micro-batch counts, which only rescales the scores. With ``"grads"`` each
    :meth:`accumulate_from_grads` call counts as one batch and scores whatever ``.grad`` holds
    (for accumulated micro-batches: the gradient of the whole step). Under a dynamic fp16 loss
    scale the raw gradients are scaled; prefer bf16 or fp32 when scores matter across steps.

    Args:
        model: the model to score (a supported architecture, dense or student).
        method: ``"taylor"`` or ``"mask"``.
        source: ``"hooks"`` (gradient hooks, the default) or ``"grads"`` (explicit
            :meth:`accumulate_from_grads` calls reading ``.grad``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        method: ImportanceMethod = "taylor",
        source: ImportanceSource = "hooks",
    ) -> None:
        if method not in ("taylor", "mask"):
            raise ValueError(f"method must be 'taylor' or 'mask', got {method!r}")
        if source not in ("hooks", "grads"):
            raise ValueError(f"source must be 'hooks' or 'grads', got {source!r}")
        self.model = model
        self.method: ImportanceMethod = method
        self.source: ImportanceSource = source
        self._adapter = adapter_for(model)
        self._handles: list[Any] = []
        self._active = False
        # Per layer: Taylor: sum |g| of (attention output, FFN in, FFN out) weights; mask with
        # source "grads": summed (head, neuron) mask gradients; mask with hooks: empty, the sums
        # live in the masks' own .grad (autograd accumulates them there).
        self._sums: list[list[torch.Tensor]] = []
        self._counts: list[list[int]] = []
        self._masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.attach()

    # ---- lifecycle -------------------------------------------------------------------------

    def attach(self) -> None:
        """(Re)attach to the model's current layers with fresh, zero accumulators."""
        self.detach()
        self._sums, self._counts, self._masks = [], [], []
        head_size = self._adapter.head_size(self.model.config)
        for layer in self._adapter.layer_list(self.model):
            o = self._adapter.attention_linears(layer)[3]
            ffn_in, ffn_out = self._adapter.ffn_linears(layer)
            if self.method == "taylor":
                self._track_weights([o.weight, ffn_in.weight, ffn_out.weight])
            elif self.source == "hooks":
                self._insert_masks(o, ffn_out, head_size)
            else:
                device = o.weight.device
                self._sums.append([torch.zeros(o.in_features // head_size, device=device),
                                   torch.zeros(ffn_out.in_features, device=device)])
                self._counts.append([0, 0])
        self._active = True

    def detach(self) -> None:
        """Stop accumulating: remove every hook, and make :meth:`accumulate_from_grads` a no-op.

        Accumulated values are kept until :meth:`attach` or :meth:`reset`.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False

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
        """Batches accumulated so far (the smallest count over tracked tensors)."""
        return min((c for counts in self._counts for c in counts), default=0)

    # ---- accumulation ----------------------------------------------------------------------

    def _track_weights(self, weights: list[nn.Parameter]) -> None:
        sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
        counts = [0] * len(weights)
        self._sums.append(sums)
        self._counts.append(counts)
        if self.source != "hooks":
            return
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

    @torch.no_grad()
    def accumulate_from_grads(self) -> None:
        """Add the gradients the scored weights' ``.grad`` holds now, as one batch.

        Only for ``source="grads"``. Call once per optimizer step, after ``backward()`` and before
        ``optimizer.step()`` (the mask estimator pairs ``.grad`` with the weights it was computed
        at) and before any gradient clipping (hooks see unclipped gradients too). Weights whose
        ``.grad`` is ``None`` (frozen, or not reached by the loss) are not counted. Does nothing
        after :meth:`detach`, like the hooks.

        Raises:
            RuntimeError: the tracker uses hooks (a call would count every batch twice), or the
                model was pruned since the last :meth:`attach` / :meth:`reset`.
        """
        if self.source != "grads":
            raise RuntimeError("accumulate_from_grads() needs ImportanceTracker(..., "
                               "source='grads'); this tracker's hooks already accumulate")
        if not self._active:
            return
        layers = list(self._adapter.layer_list(self.model))
        if len(layers) != len(self._sums):
            raise RuntimeError(self._reshaped_message())
        head_size = self._adapter.head_size(self.model.config)
        for layer, sums, counts in zip(layers, self._sums, self._counts, strict=True):
            o = self._adapter.attention_linears(layer)[3]
            ffn_in, ffn_out = self._adapter.ffn_linears(layer)
            if self.method == "taylor":
                parts = [(w, None) for w in (o.weight, ffn_in.weight, ffn_out.weight)]
            else:
                parts = [(o.weight, head_size), (ffn_out.weight, 1)]
            for i, ((w, group), acc) in enumerate(zip(parts, sums, strict=True)):
                if w.grad is None:
                    continue
                if group is None:
                    value = w.grad.abs().float()
                else:
                    # d loss / d mask_j at mask = 1, for a mask scaling input j of y = W x + b.
                    value = (w.float() * w.grad.float()).sum(0).view(-1, group).sum(1)
                if value.shape != acc.shape:
                    raise RuntimeError(self._reshaped_message())
                acc.add_(value)
                counts[i] += 1

    @staticmethod
    def _reshaped_message() -> str:
        return ("the model's shape changed since the tracker attached (pruned?); call reset() "
                "after pruning")

    # ---- state -----------------------------------------------------------------------------

    def _accumulators(self) -> list[list[torch.Tensor | None]]:
        if self.method == "mask" and self.source == "hooks":
            return [[head.grad, ffn.grad] for head, ffn in self._masks]
        return [list(layer) for layer in self._sums]

    def _accumulator_shapes(self) -> list[list[tuple[int, ...]]]:
        if self.method == "mask" and self.source == "hooks":
            return [[tuple(head.shape), tuple(ffn.shape)] for head, ffn in self._masks]
        return [[tuple(t.shape) for t in layer] for layer in self._sums]

    def state_dict(self) -> dict[str, Any]:
        """What has been accumulated since the last :meth:`attach` / :meth:`reset`.

        Returns ``{"method", "sums", "counts"}``: per layer, float32 CPU copies of the sums
        (Taylor: ``sum |g|`` of the attention-output, FFN-input and FFN-output weights; mask: the
        summed head and neuron mask gradients) and the batch counts. The sums mean the same for
        both sources, so the state loads into a tracker with either. Under DDP with
        ``source="hooks"`` it is this rank's local share; with ``"grads"`` every rank's is equal.
        Plain tensors, ints and strings only, so ``torch.load(..., weights_only=True)`` reads it.
        """
        sums = [
            [
                torch.zeros(shape) if t is None else t.detach().float().cpu().clone()
                for t, shape in zip(layer, shapes, strict=True)
            ]
            for layer, shapes in zip(self._accumulators(), self._accumulator_shapes(), strict=True)
        ]
        return {"method": self.method, "sums": sums, "counts": [list(c) for c in self._counts]}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the accumulators with :meth:`state_dict` output.

        The tracker must be attached to a model of the shape the state was taken on (e.g. the
        same checkpoint); accumulation then continues from the loaded sums and counts.

        Raises:
            ValueError: the state is from the other method or from a model of another shape.
        """
        if state.get("method") != self.method:
            raise ValueError(f"importance state of method {state.get('method')!r} cannot be "
                             f"loaded into a {self.method!r} tracker")
        sums, counts = state["sums"], state["counts"]
        saved_shapes = [[tuple(t.shape) for t in layer] for layer in sums]
        live_shapes = self._accumulator_shapes()
        if saved_shapes != live_shapes or [len(c) for c in counts] != [
            len(c) for c in self._counts
        ]:
            raise ValueError("importance state was taken on a model of another shape: "
                             f"saved {saved_shapes}, tracker {live_shapes}")
        if self.method == "mask" and self.source == "hooks":
            for masks, saved in zip(self._masks, sums, strict=True):
                for mask, value in zip(masks, saved, strict=True):
                    mask.grad = value.to(mask.device, torch.float32).clone()
        else:
            for live, saved in zip(self._sums, sums, strict=True):
                for acc, value in zip(live, saved, strict=True):
                    acc.copy_(value)
        for live_counts, saved_counts in zip(self._counts, counts, strict=True):
            # In place: the hooks' closures hold these very lists.
            live_counts[:] = [int(c) for c in saved_counts]

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
                + (", then accumulate_from_grads()" if self.source == "grads" else "")
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
            for (acc_heads, acc_ffn), shapes, counts in zip(
                self._accumulators(), self._accumulator_shapes(), self._counts, strict=True
            ):
                heads.append(_mean_abs(acc_heads, counts[0], shapes[0]))
                ffn.append(_mean_abs(acc_ffn, counts[1], shapes[1]))
        return ImportanceScores(heads=heads, ffn=ffn, num_batches=n, method=self.method)


def _mean_abs(acc: torch.Tensor | None, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    if acc is None or count == 0:
        return torch.zeros(shape)
    return (acc / count).abs().float().cpu()


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
