"""Data-parallel training for real: `torchrun --nproc_per_node=2` (gloo, CPU) runs the training stage and follows
the single-process run's loss curve, and rank 0 alone writes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from caopd.distill.distributed import World

# Greedy sampling makes the completions independent of how the step's prompts are split across processes, so the
# two runs see the same samples and differ only in the order of float sums.
FLAGS = ["--quiet", "--train.steps", "4", "--train.prompts-per-step", "4", "--train.k", "2",
         "--train.micro-batch-size", "4", "--train.sampling.temperature", "0", "--train.save-every", "2"]


def _log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line]


def test_torchrun_on_two_processes_follows_the_single_process_run(tmp_path, records):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["-m", "caopd.cli", "train", "--records", records, *FLAGS]
    one = subprocess.run([sys.executable, *train, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *train,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    single, parallel = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in parallel] == [1, 2, 3, 4]
    for a, b in zip(single, parallel):
        assert b["trained_tokens"] == a["trained_tokens"] and b["sample_accuracy"] == a["sample_accuracy"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    weights_one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert all(torch.allclose(weights_one[k], weights_two[k], atol=1e-5) for k in weights_one)
    # one summary printed and one set of checkpoints written, by rank 0
    assert two.stdout.count('"steps": 4') == 1
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_a_world_shards_prompts_round_robin_and_one_process_is_a_no_op():
    items = list(range(7))
    assert World(0, 2).shard(items) == [0, 2, 4, 6] and World(1, 2).shard(items) == [1, 3, 5]
    assert World().shard(items) == items and World().sum([1.5, 2]) == [1.5, 2]
    assert World(1, 2).is_main is False and World().is_main is True
