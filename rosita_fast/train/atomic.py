"""Crash-safe file and directory replacement: write under a temporary name, then rename.

A rename within one file system is atomic, so a reader (a resumed run) sees either the old
complete version or the new complete one, never a half-written one. Replacing a non-empty
directory takes two renames; :func:`recover_directory` repairs the one window in between.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "recover_directory", "remove_directory", "write_json_atomic",
           "write_text_atomic"]


def _fsync_path(path: Path) -> None:
    # Directories need O_RDONLY; fsync on a directory persists its entries (the renames).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the data is still written
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(directory) / name)
        _fsync_path(Path(directory))


def _siblings(target: Path, kind: str) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.{kind}-*"))


def remove_directory(path: Path) -> None:
    """Delete a directory so that an interruption never leaves a partial one under its name.

    It is renamed to a hidden name first (atomic); only then are its files deleted.
    """
    if not path.exists():
        return
    trash = path.parent / f".{path.name}.old-{os.getpid()}"
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def recover_directory(target: Path) -> None:
    """Finish or undo an interrupted :func:`atomic_directory` replacement of ``target``.

    If ``target`` is missing but its previous version was moved aside, the previous version is
    put back; leftover temporary and moved-aside copies are deleted.
    """
    old = _siblings(target, "old")
    if not target.exists() and old:
        os.replace(old[-1], target)
        old = old[:-1]
    for leftover in [*old, *_siblings(target, "tmp")]:
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``target`` when the block succeeds.

    Files written in the block are flushed to disk before the rename. If the block raises, the
    temporary directory is removed and ``target`` (if it existed) is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            aside = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, aside)
            os.replace(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Replace the file at ``path`` with ``text`` in one atomic step."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: Any) -> None:
    """Replace the file at ``path`` with ``value`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
