"""The stage trainer: distillation, iterative pruning, evaluation, checkpoints, resume, DDP.

Typical use by a recipe runner::

    from rosita_fast.train import PruningConfig, TrainConfig, train_stage

    config = TrainConfig.from_dict(recipe["stages"][i]["train"])    # rejects unknown keys
    result = train_stage(config, model=student, teacher=teacher, tokenizer=tokenizer,
                         task="sst-2", train_data=train, eval_data=dev,
                         output_dir=out, resume=args.resume, overwrite=args.overwrite)
    result.model_dir, result.best_metric, result.num_parameters

Launch with ``torchrun --nproc_per_node N`` for data-parallel training; nothing else changes.
"""

from .bert_adam import BertAdam
from .checkpoint import latest_checkpoint, list_checkpoints, prepare_output_dir
from .config import PruningConfig, TrainConfig
from .distributed import DistContext, init_distributed, shutdown_distributed
from .errors import CheckpointError, OutputDirError, TrainConfigError
from .eval_log import read_eval_log
from .evaluation import evaluate
from .lr_schedule import LRSchedule
from .selection import ModelSelection
from .trainer import Trainer, TrainResult, train_stage

__all__ = [
    "BertAdam", "CheckpointError", "DistContext", "LRSchedule", "ModelSelection",
    "OutputDirError", "PruningConfig", "TrainConfig", "TrainConfigError", "TrainResult",
    "Trainer", "evaluate", "init_distributed", "latest_checkpoint", "list_checkpoints",
    "prepare_output_dir", "read_eval_log", "shutdown_distributed", "train_stage",
]
