"""The method's per-task, per-stage hyper-parameters (method sections 4.4 and 5.2) as presets.

A recipe stage of kind ``k`` for task ``t`` starts from ``preset_for(t, k)`` and overrides what
it needs; the method's code quirks (teacher dropout, ReLU before the classifier, soft CE averaged
over classes) stay off, as in :class:`~rosita_fast.distill.KDConfig`'s defaults.

Tasks the method did not run (MRPC, STS-B, RTE, MNLI-mm) use the SST-2 values; CoLA's and MNLI's
settings 1-3 are the only other ones the method published.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["STAGE_KINDS", "preset_for", "presets_table"]

STAGE_KINDS = ("finetune", "student", "depth", "width", "width_two_stage", "one_step")

_PRED = {"prediction_weight": 1.0, "hidden_weight": 0.0}
_HIDDEN_PRED = {"prediction_weight": 1.0, "hidden_weight": 1.0}
_KD_COMMON = {"optimizer": "bert_adam", "batch_size": 32, "eval_batch_size": 32, "seed": 42}

# The HF fine-tuning run of the teacher (method 5.2 "Other runs"): AdamW, no weight decay.
_FINETUNE = {"learning_rate": 2e-5, "lr_schedule": "linear", "warmup_proportion": 0.0,
             "epochs": 5, "batch_size": 32, "optimizer": "adamw", "weight_decay": 0.0,
             "eval_every": 50, "kd": {"prediction_weight": 0.0, "gold_weight": 1.0}}

# (lr, schedule, warm-up, epochs, eval_every, patience_epochs, prune_fraction) per task.
_TABLE: dict[str, dict[str, tuple]] = {
    "student": {"cola": (2e-5, "linear", 0.1, 5, 100, None, None),
                "sst-2": (2e-5, "linear", 0.1, 5, 500, None, None),
                "qnli": (2e-5, "linear", 0.1, 3, 500, None, None),
                "qqp": (2e-5, "linear", 0.1, 3, 500, None, None),
                "mnli": (5e-5, "linear", 0.1, 3, 500, None, None)},
    "depth": {"cola": (1e-5, "none", 0.0, 10, 500, None, 0.2),
              "sst-2": (2e-5, "none", 0.0, 5, 500, None, 0.5),
              "qnli": (3e-5, "none", 0.0, 3, 500, None, 0.2),
              "qqp": (2e-5, "none", 0.0, 2, 500, None, 0.2),
              "mnli": (2e-5, "none", 0.0, 2, 500, None, 0.2)},
    "one_step": {"cola": (5e-5, "linear", 0.1, 50, 500, 10, None),
                 "sst-2": (5e-5, "linear", 0.1, 10, 500, None, None),
                 "mnli": (5e-5, "linear", 0.1, 5, 500, None, None)},
    "width_two_stage": {"cola": (1e-5, "none", 0.0, 50, 500, 10, 0.1),
                        "sst-2": (1e-5, "none", 0.0, 10, 500, None, 0.1),
                        "mnli": (5e-5, "linear", 0.0, 5, 500, None, 0.1)},
    "width": {"cola": (1e-5, "none", 0.0, 50, 500, 10, 0.01),
              "sst-2": (1e-5, "none", 0.0, 10, 500, None, 0.01),
              "qnli": (3e-5, "none", 0.0, 7, 500, None, 0.1),
              "qqp": (3e-5, "none", 0.0, 5, 500, None, 0.1),
              "mnli": (5e-5, "linear", 0.0, 5, 500, None, 0.1)},
}
_BATCH_64 = {"qnli", "qqp", "mnli"}  # method 5.1: larger batches for the large tasks


def _kd_preset(task: str, kind: str) -> dict[str, Any]:
    rows = _TABLE[kind]
    lr, schedule, warmup, epochs, eval_every, patience, fraction = rows.get(task, rows["sst-2"])
    out: dict[str, Any] = {**_KD_COMMON, "learning_rate": lr, "lr_schedule": schedule,
                           "warmup_proportion": warmup, "epochs": epochs,
                           "eval_every": eval_every,
                           "kd": dict(_PRED if kind in ("student", "depth") else _HIDDEN_PRED)}
    if task in _BATCH_64:
        out["batch_size"] = 64
    if patience is not None:
        # The method counts patience in epochs; a stage counts updates. Approximated from the
        # original (CoLA) training-set size, since the preset cannot see the data.
        out["patience_steps"] = patience * max(1, 8551 // out["batch_size"])
    if kind in ("depth", "width", "width_two_stage"):
        out["pruning"] = {"mode": "depth" if kind == "depth" else "width",
                          "prune_fraction": fraction}
    return out


def preset_for(task: str, kind: str) -> dict[str, Any]:
    """The method's train options for a stage ``kind`` on ``task`` (a fresh, mutable dict).

    Pruning presets carry only the schedule (``mode``, ``prune_fraction``); the recipe gives
    the target sizes.
    """
    task = task.lower()
    if kind == "finetune":
        return copy.deepcopy(_FINETUNE)
    if kind not in _TABLE:
        raise KeyError(f"unknown stage kind {kind!r}; known: {', '.join(STAGE_KINDS)}")
    return _kd_preset(task, kind)


def presets_table() -> str:
    """A Markdown table of the presets (for ``rosita compress --list``)."""
    lines = ["| kind | task | lr | schedule | epochs | eval_every | prune_fraction |",
             "|---|---|---|---|---|---|---|"]
    for kind in STAGE_KINDS:
        tasks = ["all"] if kind == "finetune" else list(_TABLE[kind])
        for task in tasks:
            p = preset_for("sst-2" if task == "all" else task, kind)
            fraction = (p.get("pruning") or {}).get("prune_fraction", "-")
            lines.append(f"| {kind} | {task} | {p['learning_rate']} | {p['lr_schedule']} | "
                         f"{p['epochs']} | {p['eval_every']} | {fraction} |")
    return "\n".join(lines)
