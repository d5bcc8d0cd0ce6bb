"""Teacher outputs kept per training example, so later epochs (or stages with the same teacher and
data) skip the teacher's forward.

Valid only where the teacher's outputs for an example never change: the teacher in eval mode (no
dropout; ``KDConfig.teacher_dropout`` off) and a fixed dataset (any augmentation done before
training, not drawn per epoch). The trainer checks the first; the cache itself is bound to a key
made from the teacher's parameters and the dataset's items (:func:`fingerprint`), and a new key
empties it, so a changed teacher or changed data never reuses an entry.

What is kept per example: the logits (always) and, while their total stays within
``hidden_budget_bytes``, the hidden states of the real tokens (padding positions are not kept, so
hidden states are served only to losses that exclude padding). A batch is served from the cache
only when every one of its examples has what the loss needs; otherwise the teacher runs and its
outputs fill the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def _update(h: Any, value: Any) -> None:
    # Tensors and arrays by value (repr would summarise long ones), containers item by item.
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        h.update(str((value.dtype, value.shape)).encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(repr(k).encode())
            _update(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for v in value:
            _update(h, v)
    else:
        h.update(repr(value).encode())


def fingerprint(teacher: nn.Module, dataset: Sequence[Any], extra: str = "") -> str:
    """A key for (teacher, data): a hash of every parameter and buffer of ``teacher`` (names,
    dtypes, shapes, values) and of every item of ``dataset`` (tensors by value, everything else
    by ``repr``), plus ``extra`` (e.g. which outputs the loss needs)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(extra.encode())
    for name, t in [*teacher.named_parameters(), *teacher.named_buffers()]:
        h.update(name.encode())
        _update(h, t)
    for i in range(len(dataset)):
        _update(h, dataset[i])
    return h.hexdigest()


class TeacherCache:
    """Teacher logits (and, within a memory budget, hidden states) per example index.

    Args:
        hidden_budget_bytes: how many bytes of hidden states to keep (0: logits only).
    """

    def __init__(self, hidden_budget_bytes: int = 0) -> None:
        if hidden_budget_bytes < 0:
            raise ValueError(f"hidden_budget_bytes must be >= 0, got {hidden_budget_bytes}")
        self.hidden_budget_bytes = int(hidden_budget_bytes)
        self.key: str | None = None
        self.hits = self.misses = 0
        self._logits: dict[int, torch.Tensor] = {}
        self._hidden: dict[int, tuple[torch.Tensor, ...]] = {}
        self._hidden_bytes = 0

    def __len__(self) -> int:
        return len(self._logits)

    def bind(self, key: str) -> None:
        """Use the cache for (teacher, data) ``key``; a different key than before empties it."""
        if key != self.key:
            self._logits.clear()
            self._hidden.clear()
            self._hidden_bytes = 0
            self.key = key

    def get(self, indices: Sequence[int], attention_mask: torch.Tensor,
            need_hidden: bool) -> dict[str, Any] | None:
        """The teacher outputs of a batch of examples (``logits`` and, if ``need_hidden``,
        ``hidden_states`` padded with zeros to the batch's length), or None if any example lacks
        them."""
        if self.key is None or any(i not in self._logits for i in indices) or (
                need_hidden and any(i not in self._hidden for i in indices)):
            self.misses += 1
            return None
        self.hits += 1
        device = attention_mask.device
        out: dict[str, Any] = {"logits": torch.stack([self._logits[i] for i in indices]).to(device)}
        if need_hidden:
            b, length = attention_mask.shape
            lengths = attention_mask.sum(-1).tolist()
            layers = len(self._hidden[indices[0]])
            states = []
            for layer in range(layers):
                first = self._hidden[indices[0]][layer]
                full = first.new_zeros((b, length, first.shape[-1]))
                for row, (i, n) in enumerate(zip(indices, lengths, strict=True)):
                    full[row, :n] = self._hidden[i][layer]
                states.append(full.to(device))
            out["hidden_states"] = tuple(states)
        return out

    def put(self, indices: Sequence[int], outputs: Any, attention_mask: torch.Tensor) -> None:
        """Keep a batch's teacher outputs (logits always; hidden states of the real tokens while
        the budget lasts). Rows must be right-padded (``attention_mask`` a prefix of ones)."""
        logits = outputs["logits"].detach()
        hidden = outputs.get("hidden_states") if hasattr(outputs, "get") else None
        lengths = attention_mask.sum(-1)
        if hidden and not torch.equal(attention_mask.bool(),
                                      torch.arange(attention_mask.shape[1],
                                                   device=attention_mask.device)[None]
                                      < lengths[:, None]):
            hidden = None  # not right-padded: the real tokens are not a prefix of each row
        lengths = lengths.tolist()
        for row, i in enumerate(indices):
            self._logits[i] = logits[row].clone()
            if hidden and self.hidden_budget_bytes and i not in self._hidden:
                n = int(lengths[row])
                kept = tuple(h[row, :n].detach().clone() for h in hidden)
                size = sum(t.numel() * t.element_size() for t in kept)
                if self._hidden_bytes + size <= self.hidden_budget_bytes:
                    self._hidden[i] = kept
                    self._hidden_bytes += size
