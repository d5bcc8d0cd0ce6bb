"""Data-parallel training: 2 CPU processes under torchrun (gloo) against a single process.

Every stage prunes during training, so DDP must be rebuilt around the new parameters and the
ranks must make the same pruning decisions. Dropout is off so that the only differences between
the 2-process and the 1-process run are float summation orders.

The trainer gathers importance from the gradient DDP has averaged, so even Taylor importance
(``|w| * mean |g|``, not linear in the gradient) must select the same heads and neurons on 2
processes as on one. The ``width_fixed`` stage checks that on data whose sequences all have
the same length: the hidden-state distillation loss is a mean over a batch's real tokens, and
only with equal token counts per rank is DDP's average of the per-rank means the mean over the
global batch (with dynamic lengths the two runs optimize slightly different losses, which no
importance mode can hide, so ``width`` is compared in shape only).

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

_EXACT = "width_fixed"


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


def exact_trainer(output_dir: Path) -> ScoreRecordingTrainer:
    """The width stage of :func:`ddp_stages` on sequences of one length (12 tokens)."""
    config = dict(ddp_stages())["width"]
    return ScoreRecordingTrainer(
        config, model=tiny_bert(21, layers=3, dropout=0.0),
        teacher=tiny_bert(22, layers=3, dropout=0.0),
        train_data=synthetic_data(32, 31, fixed_length=12),
        eval_data=synthetic_data(16, 32, fixed_length=12), task=TASK, collate_fn=collate(),
        output_dir=output_dir / _EXACT)


def _worker(out: Path) -> None:
    from rosita_fast.train import shutdown_distributed

    rank = int(os.environ["RANK"])
    for name, config in ddp_stages():
        trainer = ddp_trainer(name, config, out)
        result = trainer.run()
        torch.save({"state": state_of(trainer.model), "steps": result.steps},
                   out / f"{name}_rank{rank}.pt")
    trainer = exact_trainer(out)
    result = trainer.run()
    torch.save({"state": state_of(trainer.model), "steps": result.steps,
                "events": trainer.events}, out / f"{_EXACT}_rank{rank}.pt")
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


@pytest.mark.parametrize("name", ["depth", "width", _EXACT])
def test_ranks_stay_in_sync(two_process_run, name):
    rank0, rank1 = _load(two_process_run, name, 0), _load(two_process_run, name, 1)
    assert rank0["steps"] == rank1["steps"] == 8
    assert rank0["state"].keys() == rank1["state"].keys()
    for key in rank0["state"]:
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
    if name == _EXACT:  # from the averaged gradient, the ranks' importance is bit-identical
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


@pytest.mark.parametrize("name", ["depth", "width"])
def test_two_processes_match_one_process(two_process_run, tmp_path, name):
    config = dict(ddp_stages())[name]
    trainer = ddp_trainer(name, config, tmp_path)
    result = trainer.run()
    single = state_of(trainer.model)
    ddp = _load(two_process_run, name, 0)["state"]
    assert result.steps == 8
    assert single.keys() == ddp.keys()
    for key in single:
        assert single[key].shape == ddp[key].shape, key
    if name == "width":
        return  # dynamic lengths: the hidden-state loss is normalized per rank (module docstring)
    _assert_close_states(single, ddp)


def test_width_pruning_on_two_processes_keeps_what_one_process_keeps(two_process_run, tmp_path):
    trainer = exact_trainer(tmp_path)
    result = trainer.run()
    ddp = _load(two_process_run, _EXACT, 0)
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
