"""The JSON-lines log of every evaluation of a stage (one object per line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic

__all__ = ["append_eval_record", "read_eval_log", "truncate_eval_log"]


def append_eval_record(path: Path, record: dict[str, Any]) -> None:
    """Append one evaluation record (a JSON object) as a line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


def read_eval_log(path: Path) -> list[dict[str, Any]]:
    """All complete records; a last line cut short by a kill is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_eval_log(path: Path, last_step: int) -> None:
    """Drop records after ``last_step`` (a resumed run replays those steps and logs them again)."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_eval_log(path) if r.get("step", 0) <= last_step]
        write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
