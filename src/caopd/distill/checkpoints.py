"""Training checkpoints: written atomically, resumed from the newest complete one.

A checkpoint folder holds the student (safetensors), the teacher when it changes (EMA), the optimizer
state and the torch RNG state (tensors only, loaded with ``weights_only=True``), and the step and training log
(the data order, sampling seeds and learning rate are functions of the step). It appears under
its final name only once every file is written, so a crash mid-save leaves the previous one intact.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from caopd.distill.teachers import Teacher
from caopd.models.loading import hf_progress_bars

CHECKPOINT_RE = re.compile(r"^step-(\d{7})$")


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / "state.json").is_file()]
    return max(done, key=lambda p: p.name) if done else None


def save_checkpoint(out_dir: Path, step: int, student: torch.nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, teacher: Teacher, log: list[dict], keep: int) -> Path:
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with hf_progress_bars(False):  # a per-checkpoint bar would break the training bar's line
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    if teacher.kind == "ema":
        save_safetensors_model(teacher.model, str(tmp / "teacher.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "log": log}))  # written last: marks completion
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.iterdir() if CHECKPOINT_RE.match(p.name))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    teacher: Teacher) -> tuple[int, list[dict]]:
    """Restore weights, optimizer and teacher in place; return the step reached and the log so far."""
    load_safetensors_model(student, str(path / "model.safetensors"), strict=False)
    if teacher.kind == "ema":
        load_safetensors_model(teacher.model, str(path / "teacher.safetensors"), strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if (path / "rng.pt").is_file():  # older checkpoints have none
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    state = json.loads((path / "state.json").read_text())
    return int(state["step"]), list(state["log"])
