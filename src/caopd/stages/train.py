"""Stage 3 — on-policy distillation training (OPD or CaOPD; or the RLCR baseline) from the training records."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from caopd.cluster.jobs import LaunchConfig
from caopd.data import atomic_dir, file_digest, read_jsonl, write_json, write_jsonl
from caopd.distill.config import TrainConfig
from caopd.distill.checkpoints import full_weights
from caopd.distill.distributed import init_world, shard_model
from caopd.distill.teachers import Teacher, check_same_tokenizer
from caopd.distill.trainer import TrainItem, Trainer
from caopd.errors import CaopdInputError
from caopd.models.loading import METADATA_FILE, hf_progress_bars, load_model
from caopd.rollout import EngineName, make_training_engine
from caopd.tasks import get_task
from caopd.tasks.base import Example

MODEL_DIR, LOG, SUMMARY, CURVES = "model", "train_log.jsonl", "summary.json", "training_curves.png"


class TrainStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="the student's starting point: 'tiny', a folder or a hub id")
    task: str = Field("arithmetic", description="task used to verify the training rollouts")
    records: str = Field(..., description="records.jsonl from target replacement")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the distillation settings")
    engine: EngineName = Field("transformers", description="rollout engine for training samples: transformers "
                               "samples from the live student; vllm runs beside it on its GPU, synced every step")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0.0, lt=1.0, description="share of the GPU the colocated "
                                               "vLLM engine may take (the rest is the trainer's)")
    sharding: Literal["replicate", "fsdp"] = Field(
        "replicate", description="under torchrun: replicate = every process holds the whole model (data parallel); "
        "fsdp = weights, gradients and optimizer state sharded across the processes (FSDP2; the weights are "
        "gathered whole only to sample), for models whose training state does not fit one GPU")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="where training runs: this process "
                                 "(torchrun around it for several GPUs), or a TrainJob / PyTorchJob on several nodes")


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


def run_training_stage(cfg: TrainStageConfig, out_dir: str | Path, progress: bool = True,
                       pipeline_run_id: str = "") -> dict[str, Any]:
    """The training stage wherever ``cfg.launch`` puts it: in this process, under torchrun in this pod, in the
    shared workspace (checkpoints outlive the pod), or as a job on the cluster that this waits for."""
    from caopd.cluster import remote

    if cfg.launch.kind != "local":
        return remote.train_on_cluster(cfg, out_dir, pipeline_run_id)
    if cfg.launch.workspace_pvc:
        return remote.train_in_workspace(cfg, out_dir, pipeline_run_id, progress)
    return remote.train_here(cfg, out_dir, progress)


def run_training(cfg: TrainStageConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train, then write the model, log, curves and summary. Under torchrun every process trains on its share of
    each step and rank 0 alone writes (checkpoints included); the other ranks return a short summary."""
    world = init_world(cfg.sharding)
    task = get_task(cfg.task)
    items = items_from_records(cfg.records)
    torch.manual_seed(cfg.train.seed)
    loaded = load_model(cfg.model, progress=progress)
    separate = None
    if cfg.train.teacher == "separate":
        other = load_model(cfg.train.teacher_model, progress=progress)
        check_same_tokenizer(loaded.tokenizer, other.tokenizer, cfg.train.teacher_model)
        separate = other.model
    # RLCR has no teacher: the "student" kind aliases the student, so no copy is made and nothing extra saved.
    kind = "student" if cfg.train.method == "rlcr" else cfg.train.teacher
    server = None
    if cfg.train.teacher == "server":
        from caopd.distill.teacher_server import TeacherServer

        server = TeacherServer(cfg.train.teacher_server, cfg.train.top_k)
    teacher = Teacher(kind, loaded.model, cfg.train.ema_rate, separate, server)
    if world.fsdp:
        for model in {id(m): m for m in (loaded.model, teacher.model) if m is not None}.values():
            shard_model(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg.train, loaded.model, loaded.tokenizer, loaded.template, task, items,
                      make_training_engine(loaded, cfg.engine, world.rank, world.size,
                                           cfg.vllm_gpu_memory_utilization), teacher, out, progress, world)
    start = time.perf_counter()
    log = trainer.run()
    weights = full_weights(loaded.model) if world.fsdp else None
    if not world.is_main:
        return {"stage": "opd-training", "rank": world.rank, "steps": len(log), "final": log[-1] if log else {}}
    loaded.model.eval()
    with hf_progress_bars(False), atomic_dir(out / MODEL_DIR) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        loaded.tokenizer.save_pretrained(tmp)
        (Path(tmp) / METADATA_FILE).write_text(json.dumps(
            {"template": loaded.template, "base_model": cfg.model, "method": cfg.train.method,
             "train": cfg.train.model_dump()}, indent=2) + "\n")
    write_jsonl(out / LOG, log)
    from caopd.report import plot_training_curves

    plot_training_curves(log, out / CURVES, title=f"{cfg.train.method} training")
    summary = {"stage": "opd-training", "config": cfg.model_dump(), "steps": len(log),
               "seconds": round(time.perf_counter() - start, 1), "final": log[-1] if log else {},
               "records_digest": file_digest(cfg.records), "model_digest": file_digest(out / MODEL_DIR)}
    write_json(out / SUMMARY, summary)
    return summary
