import os
import shutil
from pathlib import Path

# One thread for torch in the test process and, through the environment, in every process a test starts (CLI runs,
# torchrun, kfp.local tasks, servers), unless OMP_NUM_THREADS says otherwise. The tiny model's many small ops gain
# nothing from a second thread, and on a loaded machine a thread pool waiting at each op's barrier for a descheduled
# thread makes them 10-30x slower. Set before torch loads, so that torch starts with it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if torch.get_num_threads() != int(os.environ["OMP_NUM_THREADS"]):  # torch was loaded before this file
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model():
    from caopd.models.loading import load_model

    return load_model("tiny")


def _write_arithmetic_files(folder: Path) -> tuple[Path, Path]:
    from caopd.io import write_jsonl
    from caopd.tasks.arithmetic import generate_rows

    train, evaluation = folder / "train.jsonl", folder / "eval.jsonl"
    write_jsonl(train, generate_rows(6, 0, id_prefix="train"))
    write_jsonl(evaluation, generate_rows(6, 1, id_prefix="eval"))
    return train, evaluation


@pytest.fixture
def arithmetic_files(tmp_path):
    """Small train / eval prompt files for end-to-end runs."""
    return _write_arithmetic_files(tmp_path)


@pytest.fixture(scope="session")
def session_targets(tmp_path_factory) -> Path:
    """Target replacement's output folder for the small training file: K = 2 rollouts of the tiny model per prompt.
    Built once per session (rollout estimation is the expensive part); tests read it through ``records``."""
    from caopd.config.stages import RolloutConfig, TargetsConfig
    from caopd.stages.estimate import run_rollout_estimation
    from caopd.stages.targets import run_target_replacement

    root = tmp_path_factory.mktemp("records")
    train, _ = _write_arithmetic_files(root)
    run_rollout_estimation(RolloutConfig(data=str(train), k=2), root / "rollouts", progress=False)
    run_target_replacement(TargetsConfig(data=str(train), rollouts=str(root / "rollouts" / "rollouts.jsonl"),
                                         estimates=str(root / "rollouts" / "estimates.jsonl")),
                           root / "targets")
    return root / "targets"


@pytest.fixture
def records(tmp_path, arithmetic_files, session_targets):
    """Training records (CaOPD targets) of the small training file, as ``tmp_path/targets/records.jsonl``: this
    test's own copy of the session's, so a test may change or delete it."""
    targets = shutil.copytree(session_targets, tmp_path / "targets")
    return str(targets / "records.jsonl")
