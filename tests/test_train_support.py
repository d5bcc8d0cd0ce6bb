"""Shared pieces of the trainer tests: tiny random BERTs, synthetic data, subprocess workers.

Run as a script it is the worker of the subprocess tests::

    python tests/test_train_support.py kill OUT K        # train, SIGKILL itself after update K
    torchrun --standalone --nproc_per_node 2 tests/test_train_support.py ddp OUT

Everything is built from fixed seeds, so a worker process and the test process construct the
same models and data.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

import rosita_fast  # noqa: F401  (registers the student classes with the Auto classes)
from rosita_fast.data import DynamicPaddingCollator
from rosita_fast.distill import KDConfig
from rosita_fast.train import PruningConfig, TrainConfig, Trainer

PAD = 0
VOCAB = 50
TASK = "sst-2"


class ListDataset(torch.utils.data.Dataset):
    """Items in the format the collator expects: ``input_ids`` array and ``label``."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def synthetic_data(n: int, seed: int, *, fixed_length: int | None = None) -> ListDataset:
    """Sentences of 4-12 random tokens; the label says whether token 7 occurs (learnable)."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        length = fixed_length or int(rng.integers(4, 13))
        ids = rng.integers(5, VOCAB, size=length)
        ids[0] = 2  # a CLS-like first token
        items.append({"input_ids": ids, "label": int(7 in ids[1:])})
    return ListDataset(items)


def tiny_bert(
    seed: int, *, layers: int = 2, dropout: float = 0.1, num_labels: int = 2, hidden: int = 32
) -> BertForSequenceClassification:
    """A random BERT classifier: by default hidden 32, 4 heads of 8, FFN 48, 2 labels."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=32,
                        num_labels=num_labels, pad_token_id=PAD, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


def collate() -> DynamicPaddingCollator:
    """Dynamic padding with the synthetic vocabulary's pad id."""
    return DynamicPaddingCollator(PAD)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: on a busy 2-core machine two intra-op threads spin against each
    other (tiny matmuls become ~300x slower), and one thread makes float sums repeatable across
    processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's parameters and buffers."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def quick_config(**overrides) -> TrainConfig:
    """Fine-tuning on gold labels (no teacher): 32 items, batch 8, 4 updates per epoch."""
    values = dict(epochs=2, batch_size=8, eval_batch_size=16, learning_rate=1e-3, seed=7,
                  progress=False, device="cpu", kd=KDConfig(prediction_weight=0.0,
                                                            gold_weight=1.0))
    values.update(overrides)
    return TrainConfig(**values)


def quick_trainer(output_dir: Path, *, teacher=None, **kwargs) -> Trainer:
    """A fast trainer on :func:`quick_config`; ``kwargs`` go to the config, except the
    trainer's own ``overwrite``/``resume``."""
    flags = {k: kwargs.pop(k) for k in ("overwrite", "resume") if k in kwargs}
    return Trainer(quick_config(**kwargs), model=tiny_bert(41), teacher=teacher,
                   train_data=synthetic_data(32, 42), eval_data=synthetic_data(16, 43),
                   task=TASK, collate_fn=collate(), output_dir=output_dir, **flags)


# ---- the resume scenario (kill test) ---------------------------------------------------------

def resume_config(**overrides) -> TrainConfig:
    """Distillation with dropout on; width pruning after updates 4 and 8; a checkpoint every 3
    updates; evaluation every 5 (15 updates in all)."""
    values = dict(
        epochs=3, batch_size=8, eval_batch_size=16, learning_rate=1e-3, lr_schedule="linear",
        warmup_proportion=0.1, optimizer="bert_adam", eval_every=5, checkpoint_every=3,
        keep_checkpoints=2, seed=5, progress=False, device="cpu",
        kd=KDConfig(hidden_weight=1.0, teacher_dropout=True),
        pruning=PruningConfig(mode="width", heads=2, ffn=24, embedding_rank=16, interval=4),
    )
    values.update(overrides)
    return TrainConfig(**values)


def resume_trainer(output_dir: Path, *, cls: type = Trainer, resume: bool = False,
                   **config_overrides) -> Trainer:
    """The trainer of the resume scenario: 40 training items, 5 updates per epoch."""
    return cls(resume_config(**config_overrides), model=tiny_bert(1), teacher=tiny_bert(2),
               train_data=synthetic_data(40, 11), eval_data=synthetic_data(16, 12), task=TASK,
               collate_fn=collate(), output_dir=output_dir, resume=resume)


class KilledTrainer(Trainer):
    """Dies by SIGKILL (no cleanup, like a crash or OOM kill) right after update ``KILL_AT``."""

    KILL_AT = -1

    def _after_step(self) -> None:
        if self.steps_done == self.KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


# ---- the data-parallel scenario --------------------------------------------------------------

def ddp_stages() -> list[tuple[str, TrainConfig]]:
    """Two stages with dropout off: depth pruning + AdamW, then width pruning + BertAdam."""
    common = dict(epochs=2, batch_size=8, learning_rate=1e-3, eval_every=3, seed=3,
                  progress=False, device="cpu")
    return [
        ("depth", TrainConfig(**common, lr_schedule="linear", warmup_proportion=0.2,
                              kd=KDConfig(gold_weight=0.5),
                              pruning=PruningConfig(mode="depth", layers=2, interval=4))),
        ("width", TrainConfig(**common, lr_schedule="none", optimizer="bert_adam",
                              kd=KDConfig(hidden_weight=1.0),
                              pruning=PruningConfig(mode="width", heads=2, ffn=24, interval=3))),
    ]


def ddp_trainer(name: str, config: TrainConfig, output_dir: Path) -> Trainer:
    """The trainer of one data-parallel stage (32 training items: 4 global batches/epoch)."""
    student = tiny_bert(21, layers=3, dropout=0.0)
    teacher = tiny_bert(22, layers=3, dropout=0.0)
    return Trainer(config, model=student, teacher=teacher,
                   train_data=synthetic_data(32, 31), eval_data=synthetic_data(16, 32), task=TASK,
                   collate_fn=collate(), output_dir=output_dir / name)


def _ddp_worker(out: Path) -> None:
    from rosita_fast.train import shutdown_distributed

    rank = int(os.environ["RANK"])
    for name, config in ddp_stages():
        trainer = ddp_trainer(name, config, out)
        result = trainer.run()
        torch.save({"state": state_of(trainer.model), "steps": result.steps},
                   out / f"{name}_rank{rank}.pt")
    shutdown_distributed()


def _kill_worker(out: Path, kill_at: int) -> None:
    KilledTrainer.KILL_AT = kill_at
    resume_trainer(out, cls=KilledTrainer).run()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, target = sys.argv[1], Path(sys.argv[2])
    if mode == "kill":
        _kill_worker(target, int(sys.argv[3]))
    elif mode == "ddp":
        _ddp_worker(target)
    else:
        raise SystemExit(f"unknown mode {mode}")
