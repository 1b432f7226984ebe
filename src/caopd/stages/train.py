"""Stage 3 — on-policy distillation training (OPD or CaOPD; or the RLCR baseline) from the training records."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from caopd.config.engines import RunLengths
from caopd.config.memory import check_training_fits
from caopd.config.stages import CURVES, MODEL_DIR, SUMMARY, TRAIN_LOG, TrainStageConfig
from caopd.errors import CaopdInputError
from caopd.io import atomic_dir, file_digest, read_jsonl, write_json, write_jsonl
from caopd.method.templates import render_prompt
from caopd.models import lora
from caopd.models.compat import enable_activation_checkpointing
from caopd.models.distributed import init_world, replicate_models, shard_models
from caopd.models.loading import (
    METADATA_FILE,
    encode_text,
    hf_progress_bars,
    load_model,
    load_tokenizer_and_config,
    safetensors_parameters,
)
from caopd.models.precision import compute_dtype
from caopd.rollout import make_training_engine
from caopd.stages.common import gpu_memory_bytes
from caopd.tasks import get_task
from caopd.tasks.base import Example
from caopd.training.checkpoints import full_weights
from caopd.training.objectives import TrainItem, objective_for
from caopd.training.teachers import Teacher, check_same_tokenizer
from caopd.training.trainer import Trainer


def items_from_records(path: str) -> list[TrainItem]:
    """One item per prompt: the example, its offline P and a verified correct rollout when there is one."""
    items: dict[str, TrainItem] = {}
    for i, row in enumerate(read_jsonl(path)):
        for key in ("prompt_id", "prompt", "answer", "demonstration", "p"):
            if key not in row:
                raise CaopdInputError("missing field", file=path, row=i, field=key)
        pid = row["prompt_id"]
        if pid not in items:
            example = Example(pid, row["prompt"], row["answer"], row["demonstration"], row.get("meta") or {})
            items[pid] = TrainItem(example, float(row["p"]), row.get("correct_rollout"))
    if not items:
        raise CaopdInputError("no training records", file=path)
    return list(items.values())


def trained_arms(artifact_dirs: list[str | Path]) -> dict[str, Path]:
    """Method ("opd", "caopd") -> the model folder, for training outputs in any order (a pipeline collects
    its arms from a ParallelFor): each checkpoint records the method it was trained with."""
    arms: dict[str, Path] = {}
    for artifact in map(Path, artifact_dirs):
        model_dir = artifact / MODEL_DIR
        try:
            method = json.loads((model_dir / METADATA_FILE).read_text())["method"]
        except (OSError, ValueError, KeyError) as err:
            raise CaopdInputError(f"not a training output ({err})", file=str(model_dir)) from None
        if method in arms:
            raise CaopdInputError(f"two trained models for method {method!r}", file=str(model_dir))
        arms[method] = model_dir
    return arms


def training_lengths(cfg: TrainStageConfig, trainer: Trainer, world_size: int) -> RunLengths:
    """What a colocated vLLM engine is sized for: the longest prompt as sampled (cut to ``max_prompt_tokens``),
    ``max_new_tokens``, and this process's share of a step's prompts × K."""
    longest = max(len(ids) for ids in trainer.prompt_ids.values())
    share = math.ceil(cfg.train.prompts_per_step / world_size)
    return RunLengths(longest, cfg.train.sampling.max_new_tokens, share * cfg.train.k)


def check_fits(cfg: TrainStageConfig, items: list[TrainItem], gpus: int) -> None:
    """``caopd plan``'s check of this run on this process's GPU (or ``gpu_memory_gib``), before any weights load:
    a configuration that cannot fit fails in seconds, naming what to change. Nothing to check without a GPU."""
    gpu_bytes = gpu_memory_bytes(cfg.gpu_memory_gib)
    if not gpu_bytes:
        return
    tokenized = load_tokenizer_and_config(cfg.model)
    tokenizer, thinking = tokenized.tokenizer, cfg.prompt.thinking
    longest = max(len(encode_text(tokenizer, render_prompt(tokenizer, it.example.prompt, thinking))) for it in items)
    teacher = load_tokenizer_and_config(cfg.train.teacher_model) if cfg.train.teacher == "separate" else None
    check_training_fits(cfg, tokenized.config.to_dict(), gpus, gpu_bytes,
                        min(longest, cfg.train.max_prompt_tokens or longest), safetensors_parameters(tokenized.path),
                        teacher.config.to_dict() if teacher else None,
                        safetensors_parameters(teacher.path) if teacher else None)


def checkpoint_layers(model: torch.nn.Module, say: bool) -> bool:
    """Activation checkpointing on the student's decoder layers (its backward only: a teacher's copy is made
    before); a model whose attention the prompt caches do not cover trains without it, as the log says."""
    try:
        enable_activation_checkpointing(model)
    except CaopdInputError as err:
        if say:
            print(f"note: training without activation checkpointing: {err}", file=sys.stderr)
        return False
    return True


def run_training(cfg: TrainStageConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train, then write the model, log, curves and summary. Under torchrun every process trains on its share of
    each step and writes its part of each checkpoint (its shards under FSDP); rank 0 alone writes the model, log
    and summary, and the other ranks return a short summary."""
    world = init_world(cfg.sharding, cfg.collective_timeout_minutes)
    task = get_task(cfg.task, **cfg.prompt.task_options())
    items = items_from_records(cfg.records)
    check_fits(cfg, items, world.size)
    torch.manual_seed(cfg.train.seed)
    precision, lora_base = cfg.train.precision, cfg.train.finetune == "lora"
    # A LoRA base never trains: it is stored in the compute dtype; a fully trained student keeps float32 masters.
    # Under torchrun rank 0 alone reads the weights (into the CPU's memory); the other processes build the model on
    # the meta device, and shard_models (FSDP) or replicate_models fills theirs from rank 0's: no process but rank 0
    # holds a copy in the CPU's memory (eight processes each reading an 8B model would need 8 × its size there).
    placement = ("cpu" if world.is_main else "meta") if world.size > 1 or world.fsdp else "device"
    loaded = load_model(cfg.model, progress=progress, dtype=compute_dtype(precision) if lora_base else torch.float32,
                        weights=placement)
    adapters = lora.add_adapters(loaded.model, cfg.train.lora) if lora_base else None
    separate = None
    if cfg.train.teacher == "separate":
        other = load_model(cfg.train.teacher_model, progress=progress, dtype=compute_dtype(precision),
                           weights=placement)
        check_same_tokenizer(loaded.tokenizer, other.tokenizer, cfg.train.teacher_model)
        separate = other.model
    # A method without a teacher (RLCR): the "student" kind aliases the student, so no copy is made and nothing extra
    # is saved.
    kind = cfg.train.teacher if objective_for(cfg.train).needs_teacher else "student"
    server = None
    if cfg.train.teacher == "server":
        from caopd.training.teacher_server import TeacherServer

        server = TeacherServer(cfg.train.teacher_server, cfg.train.top_k)
    teacher = Teacher(kind, loaded.model, cfg.train.ema_rate, separate, server, adapters=adapters,
                      frozen_dtype=compute_dtype(precision))
    checkpointing = cfg.train.activation_checkpointing and checkpoint_layers(loaded.model, world.is_main)
    if world.fsdp:  # fp32: no cast at all; bf16: bf16 all-gathers and compute over fp32 shards, fp32 reductions
        shard_models([loaded.model, teacher.model], None if precision == "fp32" else compute_dtype(precision))
    elif placement != "device":
        replicate_models([loaded.model, teacher.model])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The engine is made once the trainer has encoded (and cut) the prompts: a vLLM engine is sized for them.
    trainer = Trainer(cfg.train, loaded.model, loaded.tokenizer, loaded.template, task, items, None, teacher, out,
                      progress, world, thinking=cfg.prompt.thinking)
    trainer.engine = make_training_engine(loaded, cfg.engine, world.rank, world.size, cfg.vllm,
                                          training_lengths(cfg, trainer, world.size))
    truncation = trainer.prompt_truncation()
    if truncation["truncated_prompts"] and world.is_main:  # never silent: also in every step record and the summary
        print(f"note: {truncation['truncated_prompts']} of {truncation['training_prompts']} training prompts are "
              f"longer than max_prompt_tokens={truncation['max_prompt_tokens']} (the longest: "
              f"{truncation['longest_prompt_tokens']} tokens) and keep only their last tokens", file=sys.stderr)
    start = time.perf_counter()
    try:
        log = trainer.run()
        weights = full_weights(loaded.model) if world.fsdp else None
    finally:
        # A vLLM engine's memory back before the save; its shutdown also ends the process groups, so it comes after
        # the last collective (the gather of the sharded weights).
        trainer.engine.shutdown()
    if not world.is_main:
        return {"stage": "opd-training", "rank": world.rank, "steps": len(log), "final": log[-1] if log else {}}
    loaded.model.eval()
    if adapters is not None:  # the registered model is the merged one: what evaluation, vLLM and serving load
        weights = lora.merge_state_dict(weights if weights is not None else loaded.model.state_dict(),
                                        lora.lora_scaling(cfg.train.lora))
    with hf_progress_bars(False), atomic_dir(out / MODEL_DIR) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        loaded.tokenizer.save_pretrained(tmp)
        (Path(tmp) / METADATA_FILE).write_text(json.dumps(
            {"template": loaded.template, "base_model": cfg.model, "method": cfg.train.method,
             "finetune": cfg.train.finetune, "precision": precision, "train": cfg.train.model_dump()},
            indent=2) + "\n")
    write_jsonl(out / TRAIN_LOG, log)
    from caopd.evaluation.plots import plot_training_curves

    plot_training_curves(log, out / CURVES, title=f"{cfg.train.method} training")
    # total_steps: the run's length as resolved (steps, or epochs over the prompts); prompt_truncation: how many
    # distinct training prompts max_prompt_tokens cuts, and the longest prompt
    summary = {"stage": "opd-training", "config": cfg.model_dump(), "steps": len(log),
               "activation_checkpointing": checkpointing, "processes": world.size, "sharded": world.fsdp,
               "confidence_instruction": task.confidence_instruction_text,
               "total_steps": trainer.n_steps, "prompt_truncation": truncation,
               "seconds": round(time.perf_counter() - start, 1), "final": log[-1] if log else {},
               "records_digest": file_digest(cfg.records), "model_digest": file_digest(out / MODEL_DIR)}
    if hasattr(trainer.engine, "sizing"):  # the colocated vLLM engine's settings, as derived
        summary["vllm"] = trainer.engine.sizing.summary()
    write_json(out / SUMMARY, summary)
    return summary
