"""The ``rosita`` command: fine-tune, compress with a recipe, evaluate, summarise, export to ONNX.

Also runnable as ``python -m rosita_fast``. Bad input (recipe, data directory, task, tokenizers,
output directory, a model directory that is missing, empty or holds a truncated or corrupt
checkpoint) ends with a one-line ``rosita: error: ...`` and exit status 2 before any training
starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ModelDirError", "build_parser", "main"]

DEFAULT_RECIPE = "minilm-sst2"

_DESCRIPTION = """\
rosita_fast: compress BERT-family models with the ROSITA method (knowledge distillation plus
iterative depth and width pruning, vocabulary pruning and embedding factorization).

The main job is `rosita compress` with no recipe argument: ROSITA on all-MiniLM-L6-v2 for SST-2,
17-40 minutes on 2 CPU cores (by CPU). Run `rosita <command> --help` for each command."""

_FINETUNE = """\
Fine-tune a model on a GLUE task with gold labels (a one-stage pipeline of kind `finetune`,
the method's teacher recipe: AdamW, linear decay, best dev checkpoint kept).

How long: proportional to --max-steps. all-MiniLM-L6-v2 on SST-2 does about 1 update of 32
sentences per second on one free CPU core (dynamic padding, length-grouped batches), so the
default 800 steps take ~12 minutes; BERT-base is ~5x slower."""

_COMPRESS = """\
Run a compression recipe (YAML/JSON file or a built-in name) stage by stage, then write
report.md (table: shape, parameters, dev metric, CPU latency per stage in stock Hugging Face
and with the fast modules) and report.png
(metric vs parameters) into the output directory. Each stage is checkpointed; --resume
continues a killed or --stop-after'ed run.

How long: the built-in `minilm-sst2` (the default) takes 17-40 minutes on 2 CPU cores, by CPU
(budgeted for at most 60); the method-faithful `setting1`..`setting4` recipes train for the
paper's epochs and take days on a CPU (hours on a GPU)."""

_EVALUATE = """\
Evaluate a saved sequence classifier (a stage's best_model/ or any Hugging Face checkpoint)
on a GLUE split and print its metrics, parameter count and CPU latency (stock Hugging Face, and
with rosita_fast's fast modules swapped in).

How long: seconds for small models on SST-2 dev (872 sentences); about a minute for BERT-base
on the larger dev sets."""

_SUMMARY = """\
Print a saved model's shape: per-layer heads, FFN sizes and parameters, the embedding
(vocabulary, factorization rank) and the total parameter count.

How long: a few seconds (loading the model)."""

_EXPORT = """\
Write a saved sequence classifier (a stage's best_model/, any supported BERT, RoBERTa or MPNet
checkpoint) as an ONNX file for ONNX Runtime: inputs input_ids, attention_mask (and
token_type_ids where the model has segment embeddings and its tokenizer makes them), int64 with
dynamic batch and sequence axes; output logits. Students keep their per-layer shapes and
factorized embedding. The file is then run with ONNX Runtime on a padded batch and its logits
compared with torch's.

How long: seconds for a student (the torch.export-based exporter traces the model once); about
10 seconds for a BERT-base-sized model."""


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
    _add_fast_arg(parser)


def _add_fast_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-fast-modules", action="store_true",
                        help="train on the stock Hugging Face modules instead of rosita_fast's "
                        "fast modules (same function; see README 'FastModulesConfig')")
    parser.add_argument("--no-fast-paths", action="store_true",
                        help="turn off everything rosita_fast adds to training: stock modules, "
                        "plain-PyTorch distillation losses, torch's default (unfused) AdamW, no "
                        "teacher-output cache (the baseline for wall-time comparisons; same "
                        "function)")


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
                       "(main job: 17-40 min on 2 CPU cores)", description=_COMPRESS,
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
    _add_fast_arg(p)
    p.add_argument("--compare-to", type=Path, default=None, metavar="RUN_DIR",
                   help="a finished run of the same recipe (e.g. one with --no-fast-paths); the "
                   "report shows its wall time per stage beside this run's. With --resume on a "
                   "finished run, only the report is rewritten")

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

    p = sub.add_parser("export", help="write a saved model as an ONNX file for ONNX Runtime "
                       "(seconds)", description=_EXPORT, formatter_class=fmt)
    p.add_argument("model_dir", help="saved model directory or hub id")
    p.add_argument("output", type=Path, metavar="OUT.onnx",
                   help="the ONNX file to write (replaced if it exists)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: the exporter's, 18 or newer)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the ONNX Runtime vs torch comparison after the export")
    return parser


class ModelDirError(ValueError):
    """A model directory is missing, holds no model, or holds an unreadable checkpoint."""


# Weight files Hugging Face's from_pretrained reads, in its order of preference.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "spiece.model", "sentencepiece.bpe.model")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _local_path(spec: str) -> Path | None:
    """``spec`` as a local path, or ``None`` when it reads as a hub id (``name``, ``org/name``)."""
    path = Path(spec).expanduser()
    if path.exists() or path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1:
        return path
    return None


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file, or ``None`` if its header and size agree."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt"):
            return None
    except Exception as exc:  # SafetensorError and I/O errors alike: described below
        reason = _one_line(exc)
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else None
        header = handle.read(min(header_len or 0, 100_000_000))
    if header_len is None:
        return f"is truncated: {size} bytes, shorter than a safetensors header"
    if header[:1] == b"{" and header_len <= 100_000_000:
        if len(header) < header_len:
            return (f"is truncated: {size:,} bytes, its header alone should take "
                    f"{8 + header_len:,}")
        try:
            entries = json.loads(header)
            end = max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            end = None
        if end is not None and 8 + header_len + end > size:
            return f"is truncated: {size:,} bytes, its header describes {8 + header_len + end:,}"
    return f"is corrupt: not a readable safetensors file ({reason})"


def _check_model_dir(path: Path) -> None:
    """Raise :class:`ModelDirError` unless ``path`` holds a config and readable weights."""
    if not path.exists():
        raise ModelDirError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelDirError(f"{path} is a file, not a model directory (give the directory that "
                            "holds config.json and model.safetensors)")
    config = path / "config.json"
    weights = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
    if not config.is_file() and not weights:
        raise ModelDirError(f"{path} holds no model: no config.json and no model.safetensors "
                            "(or pytorch_model.bin)")
    if not config.is_file():
        raise ModelDirError(f"{path} holds {weights[0].name} but no config.json")
    if not weights:
        raise ModelDirError(f"{path} holds config.json but no weights: no model.safetensors "
                            "(or pytorch_model.bin)")
    try:
        config_dict = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{config} is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(config_dict, dict):
        raise ModelDirError(f"{config} is not a Hugging Face model config (not a JSON object)")
    files = weights[:1]
    if files[0].name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(files[0].read_text(encoding="utf-8"))["weight_map"]
                                .values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelDirError(f"{files[0]} is not a valid shard index: "
                                f"{_one_line(exc)}") from None
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise ModelDirError(f"{files[0]} lists {missing[0]}, which is missing from {path}")
        files = [path / name for name in shards]
    for file in files:
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
            if problem is not None:
                raise ModelDirError(f"{file} {problem}")


def _load_classifier(spec: str):
    """The sequence classifier in ``spec`` (a directory or hub id), in eval mode.

    Checks a local directory first, so that a missing, empty or damaged checkpoint ends with
    one line naming the file and what is wrong (:class:`ModelDirError`).
    """
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    path = _local_path(spec)
    if path is not None:
        _check_model_dir(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path or spec))
    # What a bad checkpoint raises (config, safetensors, torch.load, shape mismatches); not
    # ImportError, AttributeError and the like, which are bugs and keep their traceback.
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError,
            SafetensorError) as exc:
        if path is None:
            raise ModelDirError(f"{spec} is no local directory, and loading it as a hub id "
                                f"failed: {_one_line(exc)}") from exc
        weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), path)
        if weights.suffix == ".bin" and not zipfile.is_zipfile(weights):
            raise ModelDirError(f"{weights} is truncated or corrupt: not a readable PyTorch "
                                f"checkpoint ({_one_line(exc)})") from exc
        raise ModelDirError(f"cannot load the model in {path}: {_one_line(exc)}") from exc
    return model.eval()


def _load_tokenizer(spec: str):
    """The tokenizer saved with the model ``spec``; one-line :class:`ModelDirError` if none."""
    from transformers import AutoTokenizer

    path = _local_path(spec)
    if path is not None and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelDirError(f"{path} holds a model but no tokenizer (no tokenizer.json or "
                            "tokenizer_config.json); save it with tokenizer.save_pretrained")
    try:
        return AutoTokenizer.from_pretrained(str(path or spec))
    except (OSError, ValueError, TypeError, KeyError) as exc:  # incl. a broken tokenizer.json
        raise ModelDirError(f"cannot load the tokenizer of {path or spec}: "
                            f"{_one_line(exc)}") from exc


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
                          progress=not args.no_progress,
                          fast_modules=False if args.no_fast_modules else None,
                          fast_paths=False if args.no_fast_paths else None)
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
                          stop_after=args.stop_after, progress=not args.no_progress,
                          fast_modules=False if args.no_fast_modules else None,
                          fast_paths=False if args.no_fast_paths else None,
                          compare_to=args.compare_to)
    if result.report is not None:
        print(f"report: {result.report} (plot: {result.report.with_suffix('.png')})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .compress import count_parameters
    from .data import get_task
    from .pipeline.inputs import load_split
    from .pipeline.report import measure_latencies, score

    task = get_task(args.task)
    if (path := _local_path(args.model_dir)) is not None:
        _check_model_dir(path)  # before the tokenizer: an empty directory lacks a model first
    tokenizer = _load_tokenizer(args.model_dir)
    model = _load_classifier(args.model_dir)
    examples = load_split(task, args.split, _data_dir(args, task.name))
    metrics = score(model, tokenizer, task, examples, batch_size=args.batch_size)
    out = {"task": task.name, "split": args.split, "metrics": metrics,
           "parameters": count_parameters(model)}
    if args.latency_sentences > 0:
        latency = measure_latencies(model, tokenizer, examples[: args.latency_sentences], 1,
                                    task.max_seq_length)
        out["latency_ms_batch1_1thread"] = latency["stock"]
        out["latency_fast_ms_batch1_1thread"] = latency["fast"]
    print(json.dumps(out, indent=2))
    return 0


def _summary(args: argparse.Namespace) -> int:
    from .compress import summary

    print(summary(_load_classifier(args.model_dir)))
    return 0


# fp32 exports agree with torch to ~1e-6 of the largest logit; far above that is a wrong graph.
_EXPORT_TOLERANCE = 1e-4


def _export(args: argparse.Namespace) -> int:
    from .export import OnnxExportError, export_onnx, onnx_input_names, verify_onnx

    if args.output.is_dir():
        raise ModelDirError(f"{args.output} is a directory; give the .onnx file to write")
    model = _load_classifier(args.model_dir)
    names = onnx_input_names(model)
    try:  # feed exactly what the saved tokenizer produces, where there is one
        tokenizer_inputs = _load_tokenizer(args.model_dir).model_input_names
    except ModelDirError:
        tokenizer_inputs = None
    if tokenizer_inputs and "input_ids" in tokenizer_inputs:
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                 if n in tokenizer_inputs and (n != "token_type_ids" or n in names)]
    path = export_onnx(model, args.output, opset=args.opset, input_names=names)
    print(f"onnx: {path} (inputs {', '.join(names)} of shape (batch, sequence); output logits)")
    if not args.no_verify:
        error = verify_onnx(model, path)
        if not error <= _EXPORT_TOLERANCE:
            raise OnnxExportError(
                f"{path}: ONNX Runtime's logits differ from torch's by {error:.2g} of the largest "
                f"logit (more than {_EXPORT_TOLERANCE:g})"
            )
        print(f"checked: ONNX Runtime matches torch to {error:.1e} (relative, padded batch)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rosita`` console script; returns the exit status."""
    import rosita_fast  # noqa: F401  (registers the student models with the Auto classes)

    from .data import DataError, TokenizerMismatchError
    from .export import OnnxExportError
    from .pipeline import PipelineError, RecipeError
    from .train import CheckpointError, OutputDirError, TrainConfigError

    args = build_parser().parse_args(argv)
    handlers = {"finetune": _finetune, "compress": _compress, "evaluate": _evaluate,
                "summary": _summary, "export": _export}
    try:
        return handlers[args.command](args)
    except (RecipeError, PipelineError, DataError, TokenizerMismatchError, TrainConfigError,
            OutputDirError, CheckpointError, OnnxExportError, ValueError, OSError) as exc:
        print(f"rosita: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
