"""The ``rosita`` command: fine-tune, compress with a recipe, evaluate, summarise.

Also runnable as ``python -m rosita_fast``. Bad input (recipe, data directory, task, tokenizers,
output directory) ends with a one-line ``rosita: error: ...`` and exit status 2 before any
training starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

DEFAULT_RECIPE = "minilm-sst2"

_DESCRIPTION = """\
rosita_fast: compress BERT-family models with the ROSITA method (knowledge distillation plus
iterative depth and width pruning, vocabulary pruning and embedding factorization).

The main job is `rosita compress` with no recipe argument: ROSITA on all-MiniLM-L6-v2 for SST-2,
about 35 minutes on 2 CPU cores. Run `rosita <command> --help` for each command."""

_FINETUNE = """\
Fine-tune a model on a GLUE task with gold labels (a one-stage pipeline of kind `finetune`,
the method's teacher recipe: AdamW, linear decay, best dev checkpoint kept).

How long: proportional to --max-steps. all-MiniLM-L6-v2 on SST-2 does about 1 update of 32
sentences per second on one free CPU core (dynamic padding, length-grouped batches), so the
default 800 steps take ~12 minutes; BERT-base is ~5x slower."""

_COMPRESS = """\
Run a compression recipe (YAML/JSON file or a built-in name) stage by stage, then write
report.md (table: shape, parameters, dev metric, CPU latency per stage) and report.png
(metric vs parameters) into the output directory. Each stage is checkpointed; --resume
continues a killed or --stop-after'ed run.

How long: the built-in `minilm-sst2` (the default) takes about 35 minutes on 2 CPU cores
(budgeted for at most 60); the method-faithful `setting1`..`setting4` recipes train for the
paper's epochs and take days on a CPU (hours on a GPU)."""

_EVALUATE = """\
Evaluate a saved sequence classifier (a stage's best_model/ or any Hugging Face checkpoint)
on a GLUE split and print its metrics, parameter count and CPU latency.

How long: seconds for small models on SST-2 dev (872 sentences); about a minute for BERT-base
on the larger dev sets."""

_SUMMARY = """\
Print a saved model's shape: per-layer heads, FFN sizes and parameters, the embedding
(vocabulary, factorization rank) and the total parameter count.

How long: a few seconds (loading the model)."""


def _add_data_args(parser: argparse.ArgumentParser, *, task_default: str | None) -> None:
    parser.add_argument("--task", default=task_default,
                        help="GLUE task (sst-2, cola, mrpc, sts-b, qqp, mnli, mnli-mm, qnli, rte)"
                        + (f"; default {task_default}" if task_default else
                           "; default: the recipe's"))
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="GLUE-format directory of the task (train.tsv, dev.tsv). Default: "
                        "../shared/data/glue/<TASK> next to the repository if present, else the "
                        "`datasets` hub (glue/<task>)")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="where stages, checkpoints and the report go")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true",
                      help="replace an earlier run in --output-dir")
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in --output-dir (finished stages are skipped)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a machine shared "
                        "with other jobs, 1 is often several times faster than 2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rosita`` command (exposed for tests and docs)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="rosita", description=_DESCRIPTION, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("finetune", help="fine-tune a model on a GLUE task (minutes to hours)",
                       description=_FINETUNE, formatter_class=fmt)
    p.add_argument("--model", default="minilm",
                   help="'minilm' (bundled all-MiniLM-L6-v2), a local path or a hub id")
    _add_data_args(p, task_default="sst-2")
    _add_run_args(p)
    p.add_argument("--max-steps", type=int, default=800, help="updates (default 800)")
    p.add_argument("--learning-rate", type=float, default=5e-5, help="default 5e-5")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--eval-every", type=int, default=200, help="updates between dev evaluations")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest sequence (default: the task's, 64 for SST-2)")

    p = sub.add_parser("compress", help="run a compression recipe, write the report "
                       "(main job: ~35 min on 2 CPU cores)", description=_COMPRESS,
                       formatter_class=fmt)
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE,
                   help=f"recipe file or built-in name (default {DEFAULT_RECIPE}); see --list")
    p.add_argument("--list", action="store_true",
                   help="list the built-in recipes and the method's presets, then exit")
    p.add_argument("--model", default=None, help="replace the recipe's model")
    _add_data_args(p, task_default=None)
    p.add_argument("--output-dir", type=Path, default=None,
                   help="default runs/<recipe name>")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true",
                      help="replace an earlier run in --output-dir")
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in --output-dir (finished stages are skipped)")
    p.add_argument("--stop-after", default=None, metavar="STAGE",
                   help="stop cleanly after this stage (continue later with --resume)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice). On a machine shared "
                   "with other jobs, 1 is often several times faster than 2")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("evaluate", help="dev metrics, parameters and latency of a saved model "
                       "(seconds)", description=_EVALUATE, formatter_class=fmt)
    p.add_argument("model_dir", help="saved model directory (with its tokenizer) or hub id")
    _add_data_args(p, task_default="sst-2")
    p.add_argument("--split", default="dev", help="split to evaluate (default dev)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--latency-sentences", type=int, default=100,
                   help="sentences timed at batch 1 on one thread (0 = skip)")

    p = sub.add_parser("summary", help="per-layer shape and parameter count of a saved model "
                       "(seconds)", description=_SUMMARY, formatter_class=fmt)
    p.add_argument("model_dir", help="saved model directory or hub id")
    return parser


def _data_dir(args: argparse.Namespace, task_name: str) -> Path | None:
    from .data import get_task
    from .pipeline.inputs import default_data_dir

    if args.data_dir is not None:
        return args.data_dir
    found = default_data_dir(get_task(task_name))
    if found is None:
        print(f"rosita: no local copy of {task_name}; loading it from the datasets hub",
              file=sys.stderr)
    return found


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        if threads < 1:
            raise ValueError("--threads must be at least 1")
        torch.set_num_threads(threads)


def _finetune(args: argparse.Namespace) -> int:
    from .pipeline import recipe_from_dict, run_pipeline

    train = {"max_steps": args.max_steps, "learning_rate": args.learning_rate,
             "batch_size": args.batch_size, "eval_every": args.eval_every}
    recipe = recipe_from_dict({
        "name": "finetune", "task": args.task, "model": args.model,
        "data": {"max_length": args.max_length},
        "stages": [{"name": "finetune", "kind": "finetune", "train": train}],
    })
    _set_threads(args.threads)
    result = run_pipeline(recipe, args.output_dir, data_dir=_data_dir(args, recipe.task),
                          overwrite=args.overwrite, resume=args.resume,
                          progress=not args.no_progress)
    print(f"model: {result.stages[0].model_dir}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from .pipeline import builtin_recipes, load_recipe, presets_table, run_pipeline

    if args.list:
        for name, path in sorted(builtin_recipes().items()):
            print(f"{name}: {path}")
        print()
        print(presets_table())
        return 0
    overrides = {k: v for k, v in (("task", args.task), ("model", args.model)) if v}
    recipe = load_recipe(args.recipe, overrides=overrides)
    output_dir = args.output_dir or Path("runs") / recipe.name
    _set_threads(args.threads)
    result = run_pipeline(recipe, output_dir, data_dir=_data_dir(args, recipe.task),
                          overwrite=args.overwrite, resume=args.resume,
                          stop_after=args.stop_after, progress=not args.no_progress)
    if result.report is not None:
        print(f"report: {result.report} (plot: {result.report.with_suffix('.png')})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .compress import count_parameters
    from .data import DynamicPaddingCollator, encode_examples, get_task
    from .pipeline.inputs import load_split
    from .pipeline.report import measure_latency
    from .train import evaluate

    task = get_task(args.task)
    examples = load_split(task, args.split, _data_dir(args, task.name))
    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(args.model_dir))
    data = encode_examples(examples, tokenizer, task)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size,
                                         collate_fn=DynamicPaddingCollator.for_tokenizer(tokenizer))
    metrics = evaluate(model, loader, task, torch.device("cpu"))
    out = {"task": task.name, "split": args.split, "metrics": metrics,
           "parameters": count_parameters(model)}
    if args.latency_sentences > 0:
        out["latency_ms_batch1_1thread"] = measure_latency(
            model, tokenizer, examples[: args.latency_sentences], 1, task.max_seq_length)
    print(json.dumps(out, indent=2))
    return 0


def _summary(args: argparse.Namespace) -> int:
    from transformers import AutoModelForSequenceClassification

    from .compress import summary

    model = AutoModelForSequenceClassification.from_pretrained(str(args.model_dir))
    print(summary(model))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rosita`` console script; returns the exit status."""
    import rosita_fast  # noqa: F401  (registers the student models with the Auto classes)

    from .data import DataError, TokenizerMismatchError
    from .pipeline import PipelineError, RecipeError
    from .train import CheckpointError, OutputDirError, TrainConfigError

    args = build_parser().parse_args(argv)
    handlers = {"finetune": _finetune, "compress": _compress, "evaluate": _evaluate,
                "summary": _summary}
    try:
        return handlers[args.command](args)
    except (RecipeError, PipelineError, DataError, TokenizerMismatchError, TrainConfigError,
            OutputDirError, CheckpointError, ValueError, OSError) as exc:
        print(f"rosita: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
