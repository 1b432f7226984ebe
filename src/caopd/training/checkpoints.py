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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from caopd.errors import CaopdInputError
from caopd.models.loading import hf_progress_bars
from caopd.training.teachers import Teacher

CHECKPOINT_RE = re.compile(r"^step-(\d{7})$")


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / "state.json").is_file()]
    return max(done, key=lambda p: p.name) if done else None


@dataclass
class FullStates:
    """Whole state dicts of sharded (FSDP) training, gathered on every process, complete on rank 0."""
    student: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    teacher: dict[str, torch.Tensor] | None


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict, on the CPU of rank 0 (empty elsewhere), each tied weight (embeddings
    and head) once under its first name, as an unsharded save writes it. Collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    aliases = {alias for same in names.values() for alias in same[1:]}
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor for name, tensor in weights.items() if name not in aliases}


def full_states(student: torch.nn.Module, optimizer: torch.optim.Optimizer, teacher: Teacher) -> FullStates:
    """Collective, like ``full_weights``; the optimizer state is keyed by parameter name, not position."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return FullStates(full_weights(student), get_optimizer_state_dict(student, optimizer, options=whole),
                      full_weights(teacher.model) if teacher.kind == "ema" else None)


def save_checkpoint(out_dir: Path, step: int, student: torch.nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, teacher: Teacher, log: list[dict], keep: int,
                    states: FullStates | None = None) -> Path:
    """``states``: the gathered state dicts of sharded training (the modules then hold only this process's
    shard); without them the modules' own weights and the optimizer's state are written."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with hf_progress_bars(False):  # a per-checkpoint bar would break the training bar's line
        student.save_pretrained(tmp, safe_serialization=True, state_dict=states.student if states else None)
        tokenizer.save_pretrained(tmp)
    if teacher.kind == "ema" and states:
        save_file(states.teacher, str(tmp / "teacher.safetensors"))
    elif teacher.kind == "ema":
        save_safetensors_model(teacher.model, str(tmp / "teacher.safetensors"))
    torch.save(states.optimizer if states else optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    sharding = "fsdp" if states else "replicate"  # the optimizer state's layout differs
    (tmp / "state.json").write_text(json.dumps({"step": step, "log": log, "sharding": sharding}))  # last: complete
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.iterdir() if CHECKPOINT_RE.match(p.name))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    teacher: Teacher, fsdp: bool = False) -> tuple[int, list[dict]]:
    """Restore weights, optimizer and teacher in place; return the step reached and the log so far. Under FSDP
    every process reads the whole checkpoint and keeps its shard."""
    state = json.loads((path / "state.json").read_text())
    written = state.get("sharding", "replicate")
    if written != ("fsdp" if fsdp else "replicate"):
        raise CaopdInputError(f"written by a run with sharding={written!r}; resume it with the same sharding",
                              file=str(path), field="sharding")
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True, strict=False)  # tied weights are stored once
        set_model_state_dict(student, load_file(str(path / "model.safetensors")), options=whole)
        if teacher.kind == "ema":
            set_model_state_dict(teacher.model, load_file(str(path / "teacher.safetensors")), options=whole)
        set_optimizer_state_dict(student, optimizer, optimizer_state, options=whole)
    else:
        load_safetensors_model(student, str(path / "model.safetensors"), strict=False)
        if teacher.kind == "ema":
            load_safetensors_model(teacher.model, str(path / "teacher.safetensors"), strict=False)
        optimizer.load_state_dict(optimizer_state)
    if (path / "rng.pt").is_file():  # older checkpoints have none
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    return int(state["step"]), list(state["log"])
