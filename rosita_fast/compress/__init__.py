"""Compression engine: importance, structured pruning, factorization, vocabulary, schedules.

Typical uses::

    from rosita_fast.compress import compress, prune_, PruningSchedule, ImportanceTracker

    compress(model, layers=8, heads=2, ffn=512, embedding_rank=128, batches=loader)  # one step
    schedule = PruningSchedule.width(model, heads=2, ffn=512, embedding_rank=128,
                                     total_steps=n, prune_fraction=0.1)              # iterative
"""

from .importance import ImportanceMethod, ImportanceScores, ImportanceTracker, compute_importance
from .one_step import compress
from .optimizer import group_names, rebuild_optimizer_
from .plan import PrunePlan
from .positions import position_count, prune_positions_
from .prune import apply_plan_, plan_prune, prune_
from .report import count_parameters, summary
from .schedule import PruningEvent, PruningSchedule, linear_sizes
from .selection import global_targets, select_global, top_k
from .vocabulary import corpus_token_ids, prune_vocabulary_

__all__ = [
    "ImportanceMethod",
    "ImportanceScores",
    "ImportanceTracker",
    "PrunePlan",
    "PruningEvent",
    "PruningSchedule",
    "apply_plan_",
    "compress",
    "compute_importance",
    "corpus_token_ids",
    "count_parameters",
    "global_targets",
    "group_names",
    "linear_sizes",
    "plan_prune",
    "position_count",
    "prune_",
    "prune_positions_",
    "prune_vocabulary_",
    "rebuild_optimizer_",
    "select_global",
    "summary",
    "top_k",
]
