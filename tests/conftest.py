import os
from pathlib import Path

import pytest
import torch

# Two cores: keep the test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model():
    from caopd.models.loading import load_model

    return load_model("tiny")


@pytest.fixture
def arithmetic_files(tmp_path):
    """Small train / eval prompt files for end-to-end runs."""
    from caopd.io import write_jsonl
    from caopd.tasks.arithmetic import generate_rows

    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(train, generate_rows(6, 0, id_prefix="train"))
    write_jsonl(evaluation, generate_rows(6, 1, id_prefix="eval"))
    return train, evaluation


@pytest.fixture
def records(tmp_path, arithmetic_files):
    """Training records (CaOPD targets) of the small training file: K = 2 rollouts of the tiny model per prompt."""
    from caopd.config.stages import RolloutConfig, TargetsConfig
    from caopd.stages.estimate import run_rollout_estimation
    from caopd.stages.targets import run_target_replacement

    train, _ = arithmetic_files
    run_rollout_estimation(RolloutConfig(data=str(train), k=2), tmp_path / "rollouts", progress=False)
    run_target_replacement(TargetsConfig(data=str(train), rollouts=str(tmp_path / "rollouts" / "rollouts.jsonl"),
                                         estimates=str(tmp_path / "rollouts" / "estimates.jsonl")),
                           tmp_path / "targets")
    return str(tmp_path / "targets" / "records.jsonl")
