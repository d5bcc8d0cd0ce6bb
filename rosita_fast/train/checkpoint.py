"""The output directory of a stage: what may be overwritten, and resumable checkpoints.

Layout::

    <output_dir>/
        train_config.json          the stage's TrainConfig (marks the directory as ours)
        eval_log.jsonl             one JSON object per evaluation
        best_model/                the selected model (save_pretrained) + tokenizer
        result.json                written when the stage finishes
        checkpoints/step-00000120/ model/ (save_pretrained) + trainer_state.pt

Every directory and JSON file is written under a temporary name and renamed into place, so a
run killed at any moment leaves only complete checkpoints behind.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from .atomic import atomic_directory, recover_directory, remove_directory
from .errors import CheckpointError, OutputDirError

__all__ = [
    "BEST_MODEL_DIR", "CHECKPOINT_DIR", "CONFIG_FILE", "EVAL_LOG_FILE", "RESULT_FILE",
    "latest_checkpoint", "list_checkpoints", "load_checkpoint", "prepare_output_dir",
    "save_checkpoint", "save_model",
]

CONFIG_FILE = "train_config.json"
EVAL_LOG_FILE = "eval_log.jsonl"
RESULT_FILE = "result.json"
BEST_MODEL_DIR = "best_model"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
MODEL_SUBDIR = "model"
_OURS = (CONFIG_FILE, EVAL_LOG_FILE, RESULT_FILE, BEST_MODEL_DIR, CHECKPOINT_DIR)
_STEP_DIR = re.compile(r"^step-(\d+)$")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # save/from_pretrained draw their own progress bars, which would break the trainer's bar.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _remove_ours(output_dir: Path) -> None:
    for name in _OURS:
        # Hidden ".<name>.tmp-*" / ".<name>.old-*" are what a killed atomic write leaves.
        for path in [output_dir / name, *output_dir.glob(f".{name}.*-*")]:
            if path.is_dir():
                remove_directory(path)
            elif path.exists():
                path.unlink()


def prepare_output_dir(output_dir: Path, *, overwrite: bool, resume: bool) -> Path | None:
    """Apply the overwrite/resume policy to ``output_dir``; return the checkpoint to resume from.

    * A missing or empty directory is created and used.
    * ``resume=True``: the directory must be a trainer output directory; the newest complete
      checkpoint is returned (``None`` if the earlier run was killed before its first
      checkpoint: that run's partial files are then discarded and the stage starts over).
    * ``overwrite=True``: the trainer's own files are deleted first; other files are left alone.
    * Otherwise a non-empty directory is an error: nothing existing is overwritten.

    Raises:
        ValueError: both ``overwrite`` and ``resume``.
        OutputDirError: the directory exists and may not be used as asked.
    """
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output path {output_dir} exists and is not a directory")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        output_dir.mkdir(parents=True, exist_ok=True)
        return None
    ours = (output_dir / CONFIG_FILE).exists()
    if resume:
        if not ours:
            raise OutputDirError(f"cannot resume in {output_dir}: it has no {CONFIG_FILE}, so it "
                                 "is not the output directory of a training stage")
        recover_directory(output_dir / BEST_MODEL_DIR)
        for leftover in (output_dir / CHECKPOINT_DIR).glob(".step-*"):  # killed mid-write
            shutil.rmtree(leftover, ignore_errors=True)
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            _remove_ours(output_dir)
        return checkpoint
    if overwrite:
        _remove_ours(output_dir)
        return None
    what = "a previous run's output" if ours else "files"
    raise OutputDirError(f"output directory {output_dir} already holds {what}; pass "
                         "overwrite=True (--overwrite) to replace it, or resume=True (--resume) "
                         "to continue that run")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first.

    Only fully renamed ``step-N`` directories holding a trainer state count; temporary
    directories of interrupted writes are hidden names and never match.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file() and (path / MODEL_SUBDIR).is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``output_dir``, or ``None``."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_model(model: nn.Module, target: Path, tokenizer: Any = None) -> None:
    """Write ``model`` (and ``tokenizer``) with ``save_pretrained``, atomically replacing
    ``target``."""
    with _quiet_transformers(), atomic_directory(Path(target)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def save_checkpoint(
    output_dir: Path, step: int, model: nn.Module, state: dict[str, Any], *, keep: int
) -> Path:
    """Write a resumable checkpoint for ``step`` and delete all but the newest ``keep``.

    ``state`` holds tensors, numbers, strings, lists and dicts only (loadable with
    ``weights_only=True``); the model goes through ``save_pretrained`` so its (pruned) shape is
    recorded in its config.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    target = root / f"step-{step:08d}"
    with _quiet_transformers(), atomic_directory(target) as tmp:
        model.save_pretrained(tmp / MODEL_SUBDIR)
        torch.save(state, tmp / STATE_FILE)
    for _, old in list_checkpoints(output_dir)[:-keep]:
        remove_directory(old)
    return target


def load_checkpoint(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The model and trainer state of a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: a piece is missing or unreadable.
    """
    path = Path(path)
    try:
        state = torch.load(path / STATE_FILE, map_location=device, weights_only=True)
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(path / MODEL_SUBDIR)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc
    return model.to(device), state
