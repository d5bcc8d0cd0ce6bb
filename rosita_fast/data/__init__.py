"""GLUE data for rosita_fast: task registry, TSV and hub loaders, metrics, tokenisation with
dynamic padding, and TinyBERT-style augmentation.

Typical use by a trainer::

    task = get_task("sst-2")
    train = load_examples(task, "train", data_dir)          # data_dir=None -> datasets hub
    features = encode_examples(train, tokenizer, task)      # unpadded, compact
    loader = DataLoader(features, batch_size=32, shuffle=True,
                        collate_fn=DynamicPaddingCollator.for_tokenizer(tokenizer))
    scores = compute_metrics(task, logits, labels)           # scores[task.main_metric]
"""

from .augment import (
    MlmSubstitutes,
    Substitutes,
    VectorSubstitutes,
    augment_examples,
    candidate_positions,
    sample_variants,
)
from .collate import DynamicPaddingCollator
from .errors import DataError, TokenizerMismatchError, UnknownTaskError
from .examples import Example
from .features import EncodedDataset, encode_examples
from .hub import examples_from_hf_dataset, hub_split_name, load_hub_examples
from .loading import load_examples
from .metrics import (
    accuracy,
    average_ranks,
    compute_metrics,
    f1_score,
    matthews_corrcoef,
    pearson,
    predictions_from_outputs,
    spearman,
)
from .tasks import GlueTask, get_task, task_names
from .text import basic_tokenize
from .tokenizer_check import check_same_tokenizer, check_tokenizer_fits_model
from .tsv import load_tsv_examples, read_glue_tsv, write_glue_tsv
from .word_vectors import WordVectors

__all__ = [
    "DataError", "DynamicPaddingCollator", "EncodedDataset", "Example", "GlueTask",
    "MlmSubstitutes", "Substitutes", "TokenizerMismatchError", "UnknownTaskError",
    "VectorSubstitutes", "WordVectors", "accuracy",
    "augment_examples", "average_ranks", "basic_tokenize", "candidate_positions",
    "check_same_tokenizer", "check_tokenizer_fits_model", "compute_metrics", "encode_examples",
    "examples_from_hf_dataset", "f1_score", "get_task", "hub_split_name", "load_examples",
    "load_hub_examples", "load_tsv_examples", "matthews_corrcoef", "pearson",
    "predictions_from_outputs", "read_glue_tsv", "sample_variants", "spearman", "task_names",
    "write_glue_tsv",
]
