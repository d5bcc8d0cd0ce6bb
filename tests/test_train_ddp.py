"""Data-parallel training: 2 CPU processes under torchrun (gloo) against a single process.

Every stage prunes during training, so DDP must be rebuilt around the new parameters and the
ranks must make the same pruning decisions. Dropout is off so that the only differences between
the 2-process and the 1-process run are float summation orders.

The ``width`` stage distils hidden states on sequences of different lengths, so the ranks hold
different numbers of real tokens: DDP's average of per-rank token means would not be the mean
over the global batch's tokens, and the 2-process run would optimize a different loss. The
trainer rescales each rank's token-averaged terms by its share of the global token count, and
this stage must end with the same units kept and the same parameters (to float tolerance) as
one process. The trainer also gathers importance from the gradient DDP has averaged, so even
Taylor importance (``|w| * mean |g|``, not linear in the gradient) must select the same heads
and neurons on 2 processes as on one.

Run as a script, this file is the 2-process worker::

    torchrun --standalone --nproc_per_node 2 tests/test_train_ddp.py OUT
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_support import (
    TASK,
    collate,
    ddp_stages,
    ddp_trainer,
    single_thread,
    state_of,
    synthetic_data,
    tiny_bert,
)

from rosita_fast.compress import top_k
from rosita_fast.train import Trainer

_WIDTH = "width"


class ScoreRecordingTrainer(Trainer):
    """Records, before every pruning event, the importance scores and the units they keep."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[dict] = []

    def _after_step(self) -> None:
        schedule = self.schedule
        if schedule is None or schedule.done:
            return
        event = schedule.events[schedule.next_event]
        if event.step != self.steps_done:
            return
        # The event fires before the next update, on exactly the scores gathered so far.
        scores = schedule.tracker.scores()
        self.events.append({
            "heads": scores.heads,
            "ffn": scores.ffn,
            "kept_heads": [top_k(s, n) for s, n in zip(scores.heads, event.heads, strict=True)],
            "kept_ffn": [top_k(s, n) for s, n in zip(scores.ffn, event.ffn, strict=True)],
        })


def width_trainer(output_dir: Path) -> ScoreRecordingTrainer:
    """The width stage of :func:`ddp_stages` (the data of :func:`ddp_trainer`: 4-12 tokens per
    sequence), recording its pruning decisions."""
    config = dict(ddp_stages())[_WIDTH]
    train_data = synthetic_data(32, 31)
    # The point of the stage: unequal lengths, hence unequal token counts per rank.
    assert len({len(item["input_ids"]) for item in train_data.items}) > 1
    return ScoreRecordingTrainer(
        config, model=tiny_bert(21, layers=3, dropout=0.0),
        teacher=tiny_bert(22, layers=3, dropout=0.0), train_data=train_data,
        eval_data=synthetic_data(16, 32), task=TASK, collate_fn=collate(),
        output_dir=output_dir / _WIDTH)


def stage_trainer(name: str, output_dir: Path) -> Trainer:
    """The trainer of stage ``name``, the same in the 2-process worker and in the test."""
    if name == _WIDTH:
        return width_trainer(output_dir)
    return ddp_trainer(name, dict(ddp_stages())[name], output_dir)


def _worker(out: Path) -> None:
    from rosita_fast.train import shutdown_distributed

    rank = int(os.environ["RANK"])
    for name, _ in ddp_stages():
        trainer = stage_trainer(name, out)
        result = trainer.run()
        torch.save({"state": state_of(trainer.model), "steps": result.steps,
                    "events": getattr(trainer, "events", [])}, out / f"{name}_rank{rank}.pt")
    shutdown_distributed()


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", __file__, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _load(out: Path, name: str, rank: int) -> dict:
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=True)


@pytest.mark.parametrize("name", ["depth", _WIDTH])
def test_ranks_stay_in_sync(two_process_run, name):
    rank0, rank1 = _load(two_process_run, name, 0), _load(two_process_run, name, 1)
    assert rank0["steps"] == rank1["steps"] == 8
    assert rank0["state"].keys() == rank1["state"].keys()
    for key in rank0["state"]:
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
    if name == _WIDTH:  # from the averaged gradient, the ranks' importance is bit-identical
        assert len(rank0["events"]) == len(rank1["events"]) == 2
        for e0, e1 in zip(rank0["events"], rank1["events"], strict=True):
            assert (e0["kept_heads"], e0["kept_ffn"]) == (e1["kept_heads"], e1["kept_ffn"])
            for part in ("heads", "ffn"):
                assert all(torch.equal(a, b) for a, b in zip(e0[part], e1[part], strict=True))
    # Only rank 0 wrote files.
    logs = sorted(p.name for p in (two_process_run / name).iterdir())
    assert logs == ["best_model", "checkpoints", "eval_log.jsonl", "result.json",
                    "train_config.json"]


def _assert_close_states(single: dict, ddp: dict) -> None:
    assert single.keys() == ddp.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


def test_depth_stage_on_two_processes_matches_one_process(two_process_run, tmp_path):
    trainer = stage_trainer("depth", tmp_path)
    result = trainer.run()
    assert result.steps == 8
    _assert_close_states(state_of(trainer.model), _load(two_process_run, "depth", 0)["state"])


def test_width_stage_with_unequal_lengths_matches_one_process(two_process_run, tmp_path):
    # Hidden-state distillation on sequences of different lengths: exact only because each
    # rank's token mean is rescaled to its share of the global batch's token mean.
    trainer = width_trainer(tmp_path)
    result = trainer.run()
    ddp = _load(two_process_run, _WIDTH, 0)
    assert result.steps == ddp["steps"] == 8
    assert len(trainer.events) == len(ddp["events"]) == 2  # heads 4 -> 3 -> 2
    for single_event, ddp_event in zip(trainer.events, ddp["events"], strict=True):
        assert ddp_event["kept_heads"] == single_event["kept_heads"]
        assert ddp_event["kept_ffn"] == single_event["kept_ffn"]
        for part in ("heads", "ffn"):
            for got, want in zip(ddp_event[part], single_event[part], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    _assert_close_states(state_of(trainer.model), ddp["state"])


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]))
