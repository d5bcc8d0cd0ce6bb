"""The end report of a pipeline: a Markdown table per stage and a metric-vs-parameters plot.

Latency is measured here, on this machine's CPU: every stage's selected model runs the first
``latency_sentences`` dev sentences one at a time (batch 1, no padding, fp32, eval mode, no
grad) with ``latency_threads`` torch threads after a short warm-up; the table gives the median
milliseconds per sentence, once for the stock Hugging Face modules and once with rosita_fast's
fast modules swapped in (:class:`~rosita_fast.FastModulesConfig`). The table also says what each
stage trained on and with which fast paths, and its wall time; given a baseline run of the same
recipe (typically with the fast paths off), the baseline's wall time per stage beside it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..compress import count_parameters, position_count
from ..data import DynamicPaddingCollator, Example, GlueTask, encode_examples
from ..data.external import EXTERNAL_SETS
from ..models import model_layout
from ..train.evaluation import evaluate
from .recipe import Recipe

__all__ = ["describe_layout", "measure_latencies", "measure_latency", "provenance", "score",
           "write_report"]

_WARMUP = 5


def describe_layout(model: nn.Module) -> str:
    """Short shape string: layers, heads and FFN per layer (a range if they differ), embedding
    rank, vocabulary and usable positions (``P``)."""
    layout = model_layout(model)

    def span(values: Sequence[int]) -> str:
        return str(values[0]) if len(set(values)) == 1 else f"{min(values)}-{max(values)}"

    rank = "dense" if layout.embedding_rank is None else f"r{layout.embedding_rank}"
    heads = span(layout.heads) if layout.heads else "0"
    ffn = span(layout.intermediate_sizes) if layout.intermediate_sizes else "0"
    shape = f"L{layout.num_layers} H{heads} F{ffn} E{rank} V{layout.vocab_size}"
    positions = position_count(model)
    return shape if positions is None else f"{shape} P{positions}"


@torch.no_grad()
def measure_latency(model: nn.Module, tokenizer: Any, examples: Sequence[Example],
                    threads: int = 1, max_length: int = 128) -> float:
    """Median CPU milliseconds per example at batch size 1 (see the module docstring)."""
    model = model.eval().to("cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encoded = [tokenizer(ex.text_a, ex.text_b, truncation=True, max_length=max_length,
                             return_tensors="pt") for ex in examples]
        times = []
        for i, batch in enumerate(list(encoded[:_WARMUP]) + list(encoded)):
            start = time.perf_counter()
            model(**batch)
            if i >= _WARMUP:
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 1000.0 * statistics.median(times)


def measure_latencies(model: nn.Module, tokenizer: Any, examples: Sequence[Example],
                      threads: int = 1, max_length: int = 128) -> dict[str, float | None]:
    """:func:`measure_latency` of ``model`` as loaded (``"stock"``) and with the fast modules
    swapped in (``"fast"``; ``None`` if they cannot run this model). Swaps ``model`` in place."""
    from ..fast_modules import FastModulesConfig
    from ..swap import swap_

    out: dict[str, float | None] = {
        "stock": measure_latency(model, tokenizer, examples, threads, max_length)}
    try:
        swap_(model, FastModulesConfig())
    except (ValueError, TypeError):
        out["fast"] = None
    else:
        out["fast"] = measure_latency(model, tokenizer, examples, threads, max_length)
    return out


def score(model: nn.Module, tokenizer: Any, task: GlueTask, examples: Sequence[Example],
          max_length: int | None = None, batch_size: int = 64) -> dict[str, float]:
    """``task``'s metrics of ``model`` on labelled ``examples`` (eval mode, CPU).

    ``max_length`` ``None`` is the task's, or the model's position count where that is shorter
    (a table cut by :func:`~rosita_fast.compress.prune_positions_`); a longer explicit value
    raises ``ValueError`` instead of failing mid-evaluation.
    """
    positions = position_count(model)
    if max_length is None:
        max_length = task.max_seq_length if positions is None else min(task.max_seq_length,
                                                                        positions)
    elif positions is not None and max_length > positions:
        raise ValueError(f"max_length {max_length} exceeds the model's {positions} positions")
    data = encode_examples(list(examples), tokenizer, task, max_length=max_length)
    batches = DataLoader(data, batch_size=batch_size,
                         collate_fn=DynamicPaddingCollator.for_tokenizer(tokenizer))
    return evaluate(model, batches, task, torch.device("cpu"))


def _row(outcome: Any, task: GlueTask, dev: Sequence[Example], recipe: Recipe,
         external: Sequence[Example] | None = None) -> dict[str, Any]:
    model = AutoModelForSequenceClassification.from_pretrained(str(outcome.model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(outcome.model_dir))
    max_length = recipe.max_length(task)
    ext = None if not external else score(model, tokenizer, task, external,
                                          max_length)[task.main_metric]
    shape, parameters = describe_layout(model), count_parameters(model)
    latency = measure_latencies(model, tokenizer, dev[: recipe.report.latency_sentences],
                                recipe.report.latency_threads, max_length)
    wall = outcome.wall_seconds
    return {"stage": outcome.name, "shape": shape, "parameters": parameters,
            "metric": outcome.best_metric if outcome.dev_metric is None else outcome.dev_metric,
            "validation_metric": (outcome.best_metric if outcome.selected_on == "validation"
                                  else None),
            "validation_rows": outcome.validation_rows,
            "external_metric": ext,
            "latency_ms": latency["stock"],
            "latency_fast_ms": latency["fast"],
            "trained_on": _trained_on(outcome, recipe.train_config(
                recipe.stage(outcome.name)).weight_average_decay),
            "wall_minutes": None if wall is None else wall / 60}


def _trained_on(outcome: Any, average_decay: float | None) -> str:
    modules = (outcome.fast_modules or {}).get("student", "stock")
    averaged = [] if average_decay is None else [f"weight average {average_decay:g}"]
    paths = getattr(outcome, "paths", None)
    if paths is None:  # a record from before the paths were recorded
        return ", ".join([modules, *averaged])
    parts = [modules]
    if paths.get("distils", True):
        parts.append("fused KD" if paths.get("fused_losses") else "reference KD")
    if paths.get("fused_optimizer"):
        parts.append("fused AdamW")
    if paths.get("teacher_cache"):
        parts.append("cache")
    if paths.get("first_token"):
        parts.append("first-token last layer")
    return ", ".join(parts + averaged)


def _share(value: float | None, teacher: float | None) -> float | None:
    """``value`` as a fraction of the teacher's; ``None`` where either is missing or zero."""
    return value / teacher if value is not None and teacher else None


def write_report(recipe: Recipe, result: Any, task: GlueTask, dev: Sequence[Example], *,
                 log: Callable[[str], None] = print,
                 baseline: dict[str, Any] | None = None,
                 external: Sequence[Example] | None = None) -> Path:
    """Write ``report.md``, ``report.json``, ``report.png`` and ``run.json`` (the recipe, seeds
    and library versions: :func:`provenance`) into the pipeline's directory.

    Args:
        recipe: the recipe that ran.
        result: the :class:`~rosita_fast.pipeline.runner.PipelineResult` with every stage.
        task: its task (names the metric).
        dev: the dev examples (latency inputs).
        baseline: another run's stage wall times
            (:func:`~rosita_fast.pipeline.runner.read_stage_walls`), shown beside this run's.
        external: the labelled rows of ``recipe.report.external``; every stage is scored on
            them too, with its share of the teacher's score there.

    Returns:
        The path of ``report.md``.
    """
    out = Path(result.output_dir)
    teacher_name = recipe.teacher_stage()
    rows = [_row(s, task, dev, recipe, external) for s in result.stages]
    teacher = next(r for r in rows if r["stage"] == teacher_name)
    for r in rows:
        r["ratio"] = teacher["parameters"] / r["parameters"]
        r["retained"] = _share(r["metric"], teacher["metric"])
        r["external_retained"] = _share(r["external_metric"], teacher["external_metric"])
    metric = task.main_metric
    total_wall = sum(s.wall_seconds for s in result.stages) / 60
    base = baseline["stages"] if baseline else {}
    for r in rows:
        seconds = base.get(r["stage"], {}).get("wall_seconds")
        r["baseline_wall_minutes"] = None if seconds is None else seconds / 60
    on_validation = any(r["validation_metric"] is not None for r in rows)
    ext_name = recipe.report.external
    unseen = result.validation_sources
    unseen_text = "" if not unseen else (
        f", {sum(unseen.values())} of them the whole of {len(unseen)} source(s) that no "
        f"training row comes from ({', '.join(sorted(unseen))})")
    if result.validation_phrases_out is not None:
        unseen_text += (", whole sentences (rows no other training row contains), with the "
                        f"{result.validation_phrases_out} training rows inside them (their "
                        "phrases) left out of training too")
    selection = (f"Every stage selects its checkpoint by {metric} on a validation split of "
                 f"{rows[0]['validation_rows']} training rows that no stage trains on"
                 f"{unseen_text} (`val {metric}`); dev is evaluated once, on the selected "
                 "model, and is the figure `% of teacher` and the plot use. " if on_validation else
                 f"Every stage selected its checkpoint by dev {metric} (no validation split): "
                 "the dev figures are optimistic. ")
    lines = [f"# {recipe.name} on {task.name}", "",
             selection +
             f"Dev {metric} of the selected model of every stage (teacher: `{teacher_name}`). "
             "Parameters count every tensor, embeddings included. Latency: median CPU ms per "
             f"dev sentence at batch 1, {recipe.report.latency_threads} thread(s), fp32, "
             f"first {min(len(dev), recipe.report.latency_sentences)} dev sentences, in stock "
             "Hugging Face (HF) and with rosita_fast's fast modules (fast). `trained on`: the "
             "modules the stage trained through (fast or stock), for a distillation stage its "
             "losses (fused ops or the plain-PyTorch reference), `fused AdamW` where the "
             "optimizer ran as torch's fused kernel, `cache` where it used the "
             "teacher-output cache, and `first-token last layer` where the losses read only "
             "logits, so the last layer computed the first position only; `weight average d`: "
             "the stage evaluated, selected and saved the moving average of its weights "
             "(decay d) instead of the raw weights. `wall min`: the stage "
             "from loading its models to its final evaluation."
             + (f" `baseline wall min`: the same stage in the run in `{baseline['run_dir']}`."
                if baseline else "")
             + (f" `{ext_name} {metric}`: the selected model on {len(external)} rows of "
                f"{EXTERNAL_SETS[ext_name].describe}; no stage selected anything on them "
                "(`% ext`: of the teacher's score there)." if external else ""), "",
             f"| stage | shape | parameters | × smaller | val {metric} | dev {metric} | "
             "% of teacher | "
             + (f"{ext_name} {metric} | % ext | " if external else "")
             + "latency ms (HF) | latency ms (fast) | trained on | wall min |"
             + (" baseline wall min | speed-up |" if baseline else ""),
             "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if external else "")
             + "---:|---:|---|---:|" + ("---:|---:|" if baseline else "")]
    for r in rows:
        value = "-" if r["metric"] is None else f"{r['metric']:.4f}"
        kept = "-" if r["retained"] is None else f"{100 * r['retained']:.1f}"
        wall = "-" if r["wall_minutes"] is None else f"{r['wall_minutes']:.1f}"
        mark = " (teacher)" if r["stage"] == teacher_name != "teacher" else ""
        fast = "-" if r["latency_fast_ms"] is None else f"{r['latency_fast_ms']:.2f}"
        val = "-" if r["validation_metric"] is None else f"{r['validation_metric']:.4f}"
        ext = "" if not external else (
            f"{r['external_metric']:.4f} | "
            + ("-" if r["external_retained"] is None else f"{100 * r['external_retained']:.1f}")
            + " | ")
        lines.append(f"| {r['stage']}{mark} | {r['shape']} | {r['parameters']:,} | "
                     f"{r['ratio']:.2f} | {val} | {value} | {kept} | {ext}"
                     f"{r['latency_ms']:.2f} | {fast} | "
                     f"{r['trained_on']} | {wall} |" + (_baseline_cells(r) if baseline else ""))
    total = f"Total training wall time: {total_wall:.1f} min"
    if baseline:
        base_total = sum(v["wall_seconds"] for v in base.values()) / 60
        total += (f"; baseline {base_total:.1f} min ({base_total / total_wall:.2f}× as long)"
                  if total_wall else f"; baseline {base_total:.1f} min")
    run = provenance(recipe)
    lines += ["", total + ".", "",
              "![metric vs parameters](report.png)", "",
              "## What ran", "",
              f"Recipe `{recipe.name}` (in full in `run.json` and `pipeline.json`); seeds: "
              + ", ".join(f"{k} {v}" for k, v in run["seeds"].items()) + "; "
              + ", ".join(f"{k} {v}" for k, v in run["versions"].items()) + ".", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (out / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    _plot(rows, teacher_name, metric, out / "report.png", f"{recipe.name} on {task.name}")
    log("\n".join(lines))
    return report


def provenance(recipe: Recipe) -> dict[str, Any]:
    """What a run needs to be repeated: the recipe (plain data), every seed it uses (each
    stage's training seed and the data sampling seed), the versions of the libraries that
    decide its numbers, and the C++ backend's fp32 GEMM route (:func:`rosita_fast.ops.gemm_route`:
    the library changes the rounding)."""
    seeds = {spec.name: recipe.train_config(spec).seed for spec in recipe.stages}
    seeds["data subset"] = recipe.data.subset_seed
    versions = {"python": platform.python_version()}
    for dist in ("rosita_fast", "torch", "transformers", "numpy", "tokenizers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    from ..ops import gemm_route

    return {"recipe": recipe.to_dict(), "seeds": seeds, "versions": versions,
            "gemm_route": gemm_route()}


def _baseline_cells(row: dict[str, Any]) -> str:
    base, wall = row["baseline_wall_minutes"], row["wall_minutes"]
    if base is None:
        return " - | - |"
    ratio = f"{base / wall:.2f}×" if wall else "-"
    return f" {base:.1f} | {ratio} |"


def _plot(rows: list[dict[str, Any]], teacher_name: str, metric: str, path: Path,
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    points = [r for r in rows if r["metric"] is not None]
    ax.plot([r["parameters"] / 1e6 for r in points], [r["metric"] for r in points], "-",
            color="0.7", zorder=1)
    for r in points:
        is_teacher = r["stage"] == teacher_name
        ax.scatter(r["parameters"] / 1e6, r["metric"], marker="*" if is_teacher else "o",
                   s=160 if is_teacher else 50, color="C3" if is_teacher else "C0", zorder=2)
        label = r["stage"] + (" (teacher)" if is_teacher and r["stage"] != "teacher" else "")
        ax.annotate(label,
                    (r["parameters"] / 1e6, r["metric"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    teacher = next((r for r in points if r["stage"] == teacher_name), None)
    if teacher is not None:
        ax.axhline(teacher["metric"], color="C3", linestyle=":", linewidth=1, zorder=0)
    ax.margins(x=0.15, y=0.1)  # room for the labels next to the outermost points
    ax.set_xlabel("parameters (millions, all counted)")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
