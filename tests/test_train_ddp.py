"""Data-parallel training: 2 CPU processes under torchrun (gloo) against a single process.

Both stages prune during training, so DDP must be rebuilt around the new parameters and the
ranks must make the same pruning decisions. Dropout is off so that the only differences between
the 2-process and the 1-process run are float summation orders.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_support import ddp_stages, ddp_trainer, single_thread, state_of

SUPPORT = Path(__file__).with_name("test_train_support.py")


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
           "2", str(SUPPORT), "ddp", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _load(out: Path, name: str, rank: int) -> dict:
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=True)


@pytest.mark.parametrize("name", ["depth", "width"])
def test_ranks_stay_in_sync(two_process_run, name):
    rank0, rank1 = _load(two_process_run, name, 0), _load(two_process_run, name, 1)
    assert rank0["steps"] == rank1["steps"] == 8
    assert rank0["state"].keys() == rank1["state"].keys()
    for key in rank0["state"]:
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
    # Only rank 0 wrote files.
    logs = sorted(p.name for p in (two_process_run / name).iterdir())
    assert logs == ["best_model", "checkpoints", "eval_log.jsonl", "result.json",
                    "train_config.json"]


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
        # Taylor importance under DDP averages each rank's |gradient| rather than taking |.| of
        # the averaged gradient (see rosita_fast/train/importance_state.py), so which heads
        # survive may legitimately differ; the shapes must not.
        return
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
