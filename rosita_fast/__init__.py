"""rosita_fast: kernel-accelerated ROSITA compression for BERT-family models.

Data flows one way: model -> compression engine (``rosita_fast.compress``) -> student
(``rosita_fast.models``) -> fast modules (``rosita_fast.modules``, installed by :func:`swap_`) ->
ops (``rosita_fast.ops``) -> kernels (``rosita_fast.kernels``, ``rosita_fast._C``).
"""

from rosita_fast import ops
from rosita_fast.backends import BACKENDS, available_backends, use_backend
from rosita_fast.fast_modules import FastModulesConfig, first_token_output
from rosita_fast.modules import (
    FastTransformerLayer,
    FusedEmbedding,
    FusedFFN,
    LowRankLinear,
    PrunedSelfAttention,
)
from rosita_fast.swap import (
    LowRankConfig,
    SwapConfig,
    SwapReport,
    register_swap_handler,
    swap_,
)

# --- compression engine exports (issue 3) ---
# isort: split
# Importing rosita_fast.models registers the student configs/models with the transformers Auto
# classes, so a saved student loads with AutoModel*.from_pretrained after `import rosita_fast`.
# The one-step `compress()` function stays at rosita_fast.compress.compress: exporting it here
# would shadow the rosita_fast.compress subpackage attribute.
from rosita_fast import compress, models  # noqa: F401
from rosita_fast.compress import (  # noqa: F401
    ImportanceTracker,
    PruningSchedule,
    count_parameters,
    prune_,
    prune_positions_,
    prune_vocabulary_,
    summary,
)

# --- end compression engine exports ---

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FastModulesConfig",
    "FastTransformerLayer",
    "FusedEmbedding",
    "FusedFFN",
    "PrunedSelfAttention",
    "ImportanceTracker",
    "PruningSchedule",
    "LowRankConfig",
    "LowRankLinear",
    "SwapConfig",
    "SwapReport",
    "available_backends",
    "compress",
    "count_parameters",
    "first_token_output",
    "models",
    "ops",
    "prune_",
    "prune_positions_",
    "prune_vocabulary_",
    "register_swap_handler",
    "summary",
    "swap_",
    "use_backend",
]
