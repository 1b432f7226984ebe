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
    from caopd.data import write_jsonl
    from caopd.tasks.arithmetic import generate_rows

    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(train, generate_rows(6, 0, id_prefix="train"))
    write_jsonl(evaluation, generate_rows(6, 1, id_prefix="eval"))
    return train, evaluation
