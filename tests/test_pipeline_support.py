"""Shared fixtures of the pipeline and CLI tests (no tests here).

A tiny random-init BERT with a tiny WordPiece tokenizer, a tiny synthetic SST-2 directory whose
labels follow the sentiment words (so a few updates already move the dev accuracy), and a tiny
four-stage ROSITA recipe over them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

POSITIVE = ["good", "great", "fun", "lovely", "moving"]
NEGATIVE = ["bad", "dull", "awful", "boring", "flat"]
FILLER = ["the", "film", "movie", "plot", "is", "was", "very", "a", "story", "acting", "and",
          "quite", "cast", "but", "ending", "music"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Tokens no training sentence uses: vocabulary pruning must drop them.
UNUSED = ["spare", "extra", "unused", "##s", "##ing"]


def _sentence(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, rng.randint(2, 6))
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def write_glue_dir(path: Path, *, n_train: int = 160, n_dev: int = 40, seed: int = 0) -> Path:
    """A GLUE-format SST-2 directory (``sentence<TAB>label`` with header)."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            rows.append(f"{_sentence(rng, label)}\t{label}")
        (path / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_tiny_model(path: Path, *, extra_tokens: tuple[str, ...] = (), seed: int = 0) -> Path:
    """A random-init 2-layer BERT classifier and its WordPiece tokenizer, saved to ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + POSITIVE + NEGATIVE + FILLER + UNUSED + list(extra_tokens)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        num_labels=2, pad_token_id=0)
    BertForSequenceClassification(config).save_pretrained(str(path))
    return path


def tiny_recipe(model: Path, **changes: Any) -> dict[str, Any]:
    """A four-stage ROSITA recipe (teacher, student, depth 2->1, width 4->2 heads) in seconds."""
    common = {"eval_every": 4, "batch_size": 8, "eval_batch_size": 16, "progress": False,
              "device": "cpu"}
    recipe = {
        "name": "tiny-rosita",
        "task": "sst-2",
        "model": str(model),
        "data": {"max_length": 16, "validation_size": 32},
        "report": {"latency_sentences": 5},
        "stages": [
            {"name": "teacher", "kind": "finetune",
             "train": {**common, "max_steps": 12, "learning_rate": 1e-3}},
            {"name": "student", "kind": "student", "init": "teacher", "teacher": "teacher",
             "data": "augmented", "vocabulary": "corpus",
             "train": {**common, "max_steps": 4, "learning_rate": 1e-3}},
            {"name": "depth", "kind": "depth", "init": "student", "teacher": "student",
             "train": {**common, "max_steps": 8, "learning_rate": 1e-3,
                       "pruning": {"layers": 1, "prune_fraction": 0.5}}},
            {"name": "width", "kind": "width", "init": "depth", "teacher": "depth",
             "train": {**common, "max_steps": 8, "learning_rate": 1e-3,
                       "pruning": {"heads": 2, "ffn": 16, "embedding_rank": 8,
                                   "prune_fraction": 0.5}}},
        ],
    }
    recipe.update(changes)
    return recipe


@pytest.fixture
def tiny_setup(tmp_path: Path) -> dict[str, Path]:
    """Paths of a tiny model and a tiny SST-2 directory; torch on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield {"model": write_tiny_model(tmp_path / "model"),
               "data": write_glue_dir(tmp_path / "SST-2"), "root": tmp_path}
    finally:
        torch.set_num_threads(previous)
