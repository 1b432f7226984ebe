"""Training checkpoints: written atomically, resumed from the newest complete one.

A checkpoint folder holds the student, the teacher when it changes (EMA), the optimizer state, each process's RNG
state (``rng-<rank>.pt``; tensors only, loaded with ``weights_only=True``), and the step and training log in
``state.json`` (the data order, sampling seeds and learning rate are functions of the step). Two layouts:

- replicated training (one process, or every process holding the whole model): an HF folder rank 0 writes — the
  student by ``save_pretrained`` (in shards with an index when it is large), ``teacher.safetensors`` and
  ``optimizer.pt``; with LoRA, ``adapters.safetensors`` instead of the model (the student's adapters and an EMA
  teacher's: the frozen base never changes and is read from the model again on resume);
- sharded training (FSDP): a ``torch.distributed.checkpoint`` folder every process writes its own shards into (the
  student or, with LoRA, its adapters; the AdamW state; an EMA teacher; nothing gathered anywhere) and reads back,
  resharded when the number of processes changed.

Every process writes into one temporary folder; once all are done, rank 0 writes ``state.json`` last and renames the
folder to its final name, so a crash mid-save leaves the previous checkpoint the newest complete one. Under torchrun
the folder must be one every process sees (the multi-node jobs mount one shared volume).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from caopd.errors import CaopdInputError
from caopd.models.distributed import World
from caopd.models.loading import hf_progress_bars, load_weights
from caopd.models.lora import is_adapted
from caopd.training.teachers import Teacher

CHECKPOINT_RE = re.compile(r"^step-(\d{7})$")
STATE_FILE = "state.json"  # written last: its presence marks a complete checkpoint
ADAPTERS_FILE = "adapters.safetensors"  # a LoRA run's checkpoint: its adapters, the base being the model's own
ADAPTER_MARK = "lora_"  # in the name of every LoRA adapter tensor PEFT injects


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: p.name) if done else None


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


def _own_teacher(teacher: Teacher, student: torch.nn.Module) -> torch.nn.Module | None:
    """The teacher's weights that a checkpoint must keep beside the student's: an EMA teacher's own model. (A LoRA
    EMA teacher is an adapter inside the student's modules, saved with them.)"""
    if teacher.kind == "ema" and teacher.model is not None and teacher.model is not student:
        return teacher.model
    return None


# --- sharded (FSDP): torch.distributed.checkpoint, each process its own shards ----------------------------------

def changing_weights(state: dict[str, Any]) -> dict[str, Any]:
    """What of a student's state dict a checkpoint must hold: everything, or with LoRA only the adapters (the
    student's and an EMA teacher's; the frozen base is read from the model again on resume, as at the start)."""
    adapters = {name: tensor for name, tensor in state.items() if ADAPTER_MARK in name}
    return adapters or state


def sharded_state(student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  teacher: Teacher) -> dict[str, Any]:
    """The state a sharded checkpoint holds, as this process's shards (DTensors): what DCP writes, and the
    template it reads into. The optimizer state is keyed by parameter name (DCP reshards it by name)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"student": changing_weights(get_model_state_dict(student)),
                             "optimizer": get_optimizer_state_dict(student, optimizer)}
    own = _own_teacher(teacher, student)
    if own is not None:
        state["teacher"] = get_model_state_dict(own)
    return state


def _save_shards(folder: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 teacher: Teacher) -> None:
    import torch.distributed.checkpoint as dcp

    # Collective: the write plans meet on rank 0 (names and shapes only), each process writes its own file.
    dcp.save(sharded_state(student, optimizer, teacher), storage_writer=dcp.FileSystemWriter(folder))


def _load_shards(folder: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 teacher: Teacher) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = sharded_state(student, optimizer, teacher)  # initialises the optimizer's state (a step at lr 0)
    dcp.load(state, storage_reader=dcp.FileSystemReader(folder))
    set_model_state_dict(student, state["student"], options=StateDictOptions(strict=not is_adapted(student)))
    set_optimizer_state_dict(student, optimizer, state["optimizer"])
    own = _own_teacher(teacher, student)
    if own is not None:
        set_model_state_dict(own, state["teacher"])


def read_sharded_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, whole, in this one process (no process group): for inspection and
    tests. Keys are DCP's flattened names, e.g. ``student.model.norm.weight``, ``teacher.lm_head.weight``,
    ``optimizer.state.model.norm.weight.exp_avg``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path)
    metadata = reader.read_metadata()
    tensors = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
               for name, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors


# --- both layouts ------------------------------------------------------------------------------------------------

def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-{rank}.pt"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # a process that has used its GPU (sampling there draws from its generator)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(folder: Path, rank: int) -> None:
    """This process's RNG as it was saved; a process the saving run did not have keeps its own (a run resumed on
    more processes), and a checkpoint older than per-process files has rank 0's as ``rng.pt``."""
    file = _rng_file(folder, rank)
    if not file.is_file() and rank == 0:
        file = folder / "rng.pt"
    if not file.is_file():
        return
    state = torch.load(file, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, student: torch.nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, teacher: Teacher, log: list[dict], keep: int,
                    world: World | None = None) -> Path:
    """Write the checkpoint after ``step`` and keep the newest ``keep``; return its folder. Every process calls it
    (collective under torchrun): under FSDP each writes its shards, replicated rank 0 writes the HF folder; each
    writes its RNG state."""
    world = world or World()
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed half-way
        tmp.mkdir()
    world.barrier()  # the empty folder exists before anyone writes into it
    if world.fsdp:
        _save_shards(tmp, student, optimizer, teacher)
    elif world.is_main and is_adapted(student):  # the adapters alone: the frozen base never changes
        save_file(changing_weights(student.state_dict()), str(tmp / ADAPTERS_FILE))
        with hf_progress_bars(False):
            tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    elif world.is_main:
        with hf_progress_bars(False):  # a per-checkpoint bar would break the training bar's line
            student.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        own = _own_teacher(teacher, student)
        if own is not None:
            save_safetensors_model(own, str(tmp / "teacher.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(_rng_state(), _rng_file(tmp, world.rank))
    world.barrier()  # every process's files are written
    if world.is_main:
        # The optimizer state's layout differs between the two: a checkpoint resumes with the sharding it was made by.
        sharding = "fsdp" if world.fsdp else "replicate"
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "log": log, "sharding": sharding,
                                                  "processes": world.size}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in root.iterdir() if CHECKPOINT_RE.match(p.name))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    teacher: Teacher, world: World | None = None) -> tuple[int, list[dict]]:
    """Restore weights, optimizer, teacher and this process's RNG in place; return the step reached and the log so
    far. Every process calls it (collective under FSDP: each reads its own shards, resharded by DCP when the
    checkpoint was written by another number of processes)."""
    world = world or World()
    state = json.loads((path / STATE_FILE).read_text())
    written = state.get("sharding", "replicate")
    if written != ("fsdp" if world.fsdp else "replicate"):
        raise CaopdInputError(f"written by a run with sharding={written!r}; resume it with the same sharding",
                              file=str(path), field="sharding")
    if world.fsdp:
        if not (path / ".metadata").is_file():  # DCP's index of the shards
            raise CaopdInputError("a sharded checkpoint in the gathered layout of an earlier version, which this "
                                  "version does not read; start the run afresh", file=str(path), field=".metadata")
        _load_shards(path, student, optimizer, teacher)
    elif (path / ADAPTERS_FILE).is_file():
        _load_adapters(student, path / ADAPTERS_FILE)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    else:
        load_weights(student, path)
        own = _own_teacher(teacher, student)
        if own is not None:
            load_safetensors_model(own, str(path / "teacher.safetensors"), strict=False)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    _restore_rng(path, world.rank)
    return int(state["step"]), list(state["log"])


def _load_adapters(student: torch.nn.Module, file: Path) -> None:
    """A LoRA checkpoint's adapters into the student, every one by name (the base is the model's own)."""
    adapters = load_file(str(file))
    expected = changing_weights(student.state_dict())
    if adapters.keys() != expected.keys():
        missing, unknown = sorted(expected.keys() - adapters.keys()), sorted(adapters.keys() - expected.keys())
        raise CaopdInputError(f"the adapters do not match this run's (missing {missing[:3]}, unknown {unknown[:3]}); "
                              "resume with the LoRA settings the checkpoint was written with", file=str(file),
                              field="lora")
    student.load_state_dict(adapters, strict=False)
