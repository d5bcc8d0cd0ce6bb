"""The tqdm progress bar of a stage: loss, learning rate, current shape, parameter count."""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compress import count_parameters
from ..models import UnsupportedArchitectureError, model_layout

__all__ = ["LossMeter", "StageProgress", "describe_shape", "format_count"]

_log = logging.getLogger("rosita_fast.train")


def format_count(n: int) -> str:
    """``14473216 -> '14.5M'``: short enough for a progress bar."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _per_layer(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


def describe_shape(model: nn.Module) -> str:
    """``'L8 H2 F512 E128'``: layers, heads and FFN size per layer, embedding rank."""
    try:
        layout = model_layout(model)
    except UnsupportedArchitectureError:
        return type(model).__name__
    rank = "dense" if layout.embedding_rank is None else str(layout.embedding_rank)
    return (f"L{layout.num_layers} H{_per_layer(layout.heads)} "
            f"F{_per_layer(layout.intermediate_sizes)} E{rank}")


class StageProgress:
    """A progress bar over the stage's updates (a no-op when disabled, e.g. on rank > 0)."""

    def __init__(self, total: int, initial: int, *, enabled: bool, desc: str = "train") -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc,
                        dynamic_ncols=True, leave=True)
        self.step = initial
        self.shape = ""
        self.params = ""

    def set_model(self, model: nn.Module) -> None:
        """Refresh the shape and parameter count shown (after pruning or loading)."""
        self.shape = describe_shape(model)
        self.params = format_count(count_parameters(model))

    def show(self, step: int, loss: float | None, lr: float) -> None:
        """Move the bar to ``step`` updates and show the latest loss and learning rate."""
        postfix = {"lr": f"{lr:.2e}", "shape": self.shape, "params": self.params}
        if loss is not None:
            postfix = {"loss": f"{loss:.4f}", **postfix}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.step)
        self.step = step

    def write(self, message: str) -> None:
        """Print a line above the bar; with the bar disabled, log it at INFO level instead."""
        if self.bar.disable:
            _log.info(message)
        else:
            self.bar.write(message, file=sys.stderr)  # the bar's stream, not stdout

    def close(self) -> None:
        """Finish the bar."""
        self.bar.close()


class LossMeter:
    """Training-loss sums kept on the device, read back only when shown or logged.

    Calling ``.item()`` every step would make the CPU wait for the GPU at every step. Two
    windows are tracked: since the last evaluation (for the log, and saved in checkpoints so a
    resumed run logs the same values) and since the progress bar was last refreshed.
    """

    def __init__(self, total: float, count: int, device: torch.device) -> None:
        self.sum = torch.tensor(total, dtype=torch.float64, device=device)
        self.count = count
        self._shown_sum, self._shown_count = float(total), count

    def add(self, loss: torch.Tensor) -> None:
        """Count one update's loss."""
        self.sum += loss.detach()
        self.count += 1

    def recent(self) -> float | None:
        """Mean loss since the previous call (``None`` if no update happened since)."""
        total = float(self.sum.item())
        n = self.count - self._shown_count
        mean = (total - self._shown_sum) / n if n else None
        self._shown_sum, self._shown_count = total, self.count
        return mean

    def reset(self) -> None:
        """Start a new evaluation window."""
        self.sum.zero_()
        self.count, self._shown_sum, self._shown_count = 0, 0.0, 0

    def state(self) -> list[float | int]:
        """``[sum, count]`` of the evaluation window, for checkpoints."""
        return [float(self.sum.item()), self.count]
