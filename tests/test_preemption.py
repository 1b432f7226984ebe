"""Crash and resume: training killed with SIGKILL at three random steps and preempted with SIGTERM once reaches the
same weights as an uninterrupted run; a non-finite loss stops with the last good checkpoint kept."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caopd.config.training import TrainConfig
from caopd.errors import TrainingStopped
from caopd.models.loading import load_model
from caopd.rollout.transformers_engine import TransformersEngine
from caopd.stages.train import items_from_records
from caopd.tasks import get_task
from caopd.training.checkpoints import latest_checkpoint
from caopd.training.teachers import Teacher
from caopd.training.trainer import Trainer, sigterm_flag

STEPS = 12
TRAIN_FLAGS = ["--train.steps", str(STEPS), "--train.prompts-per-step", "3", "--train.k", "2",
               "--train.save-every", "1", "--train.micro-batch-size", "4", "--train.teacher", "ema",
               "--train.keep-checkpoints", "2"]


def _train(records: str, out: Path) -> subprocess.Popen:
    # The CLI in its own process, as a pod runs it; the same environment (threads) for every run.
    return subprocess.Popen([sys.executable, "-m", "caopd.cli", "train", "--records", records, "--out", str(out),
                             "--quiet", *TRAIN_FLAGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(process: subprocess.Popen, out: Path, step: int, timeout: float = 300.0) -> None:
    marker = out / "checkpoints" / f"step-{step:07d}" / "state.json"
    deadline = time.monotonic() + timeout
    while not marker.is_file():
        assert process.poll() is None, f"training ended before step {step}: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no checkpoint for step {step} after {timeout} s"
        time.sleep(0.005)


@pytest.mark.slow  # five training processes, killed and resumed
@pytest.mark.timeout(1200)  # 40 s to 2.5 min on 2 cores, by their load; its own waits allow more
def test_sigkill_three_times_and_sigterm_once_reach_the_uninterrupted_weights(tmp_path, records):
    straight = _train(records, tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.communicate()[1][-2000:]

    out = tmp_path / "interrupted"
    kill_after = sorted(random.Random(7).sample(range(1, STEPS - 3), 3))
    for step in kill_after:  # SIGKILL: no warning, possibly mid-step or mid-save
        process = _train(records, out)
        _wait_for_checkpoint(process, out, step)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    process = _train(records, out)  # SIGTERM: a preempted pod; the step in flight finishes and is saved
    _wait_for_checkpoint(process, out, STEPS - 2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    stderr = process.communicate()[1]
    assert "SIGTERM: saved" in stderr and "run the same command again to resume" in stderr
    assert int(latest_checkpoint(out).name.removeprefix("step-")) < STEPS
    process = _train(records, out)
    assert process.wait(timeout=600) == 0, process.communicate()[1][-2000:]

    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [line for line in (out / "train_log.jsonl").read_text().splitlines() if line]
    assert len(log) == STEPS  # every step once, in order, across the four restarts


def test_a_non_finite_loss_stops_with_the_last_good_checkpoint_kept(tmp_path, records):
    cfg = TrainConfig(steps=4, prompts_per_step=3, k=2, save_every=1, micro_batch_size=4)

    def trainer() -> Trainer:
        loaded = load_model("tiny")
        return Trainer(cfg, loaded.model, loaded.tokenizer, loaded.template, get_task("arithmetic"),
                       items_from_records(records), TransformersEngine(loaded.model, loaded.tokenizer),
                       Teacher("frozen", loaded.model), tmp_path / "t", progress=False)

    first = trainer()
    first.cfg = cfg.model_copy(update={"steps": 2})
    first.run()
    good = load_file(tmp_path / "t" / "checkpoints" / "step-0000002" / "model.safetensors")
    second = trainer()  # resumes from step 2, with a teacher whose scores overflow (as an fp16 one can)
    with torch.no_grad():
        next(second.teacher.model.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingStopped, match="non-finite loss .* step 3; stopped with the last good") as err:
        second.run()
    assert err.value.exit_code == 3
    assert latest_checkpoint(tmp_path / "t").name == "step-0000002"
    kept = load_file(tmp_path / "t" / "checkpoints" / "step-0000002" / "model.safetensors")
    assert all(torch.equal(good[k], kept[k]) for k in good)


@pytest.mark.slow  # a process of its own
def test_sigterm_outside_training_keeps_its_usual_meaning():
    # The handler is installed only while the loop runs: afterwards SIGTERM ends a process as before.
    script = ("import signal, os, sys\nfrom caopd.training.trainer import sigterm_flag\n"
              "with sigterm_flag() as flag:\n    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    assert flag.is_set()\nos.kill(os.getpid(), signal.SIGTERM)\nsys.exit(0)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == -signal.SIGTERM, result.stderr


def test_while_training_sigterm_sets_the_flag_and_the_previous_handler_comes_back_after():
    # In this process (no kill): the handler is swapped in for the loop and the previous one restored.
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_flag() as flag:
        assert signal.getsignal(signal.SIGTERM) is not before  # else the kill below would end the test run
        assert not flag.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.wait(10)
    assert signal.getsignal(signal.SIGTERM) is before
