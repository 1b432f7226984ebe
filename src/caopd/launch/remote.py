"""The training stage outside this process: under torchrun in this pod (several GPUs), in the shared workspace
(checkpoints that outlive the pod), or as a TrainJob / PyTorchJob: stage the inputs in the workspace, launch the
job, wait, and bring the model back as this step's output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from caopd.config.launch import LaunchConfig
from caopd.config.stages import CURVES, MODEL_DIR, SUMMARY, TRAIN_LOG, TrainStageConfig
from caopd.config.training import total_steps
from caopd.errors import TrainingStopped
from caopd.io import atomic_dir, atomic_file, file_digest, read_jsonl, write_json
from caopd.launch.jobs import LABEL_DIGEST, LABEL_METHOD, job_manifest, job_name
from caopd.launch.launcher import JobLauncher, JobRef, launching_pod_owner
from caopd.stages.sources import Found, model_path
from caopd.stages.train import run_training
from caopd.training.checkpoints import CHECKPOINT_RE, checkpoint_root

STAGED_RECORDS, STAGED_MODEL, STAGED_TEACHER, CONFIG_FILE, OUT_DIR = (
    "records.jsonl", "base_model", "teacher_model", "config.json", "out")


def _stage_file(src: Path, dst: Path) -> None:
    if dst.is_file() and file_digest(dst) == file_digest(src):
        return
    with src.open("rb") as source, atomic_file(dst) as target:
        shutil.copyfileobj(source, target)


def _stage_folder(src: str, dst: Path) -> str:
    """A model folder on this pod is copied to the workspace; 'tiny' and hub ids resolve on the nodes."""
    if not Path(src).is_dir():
        return src
    if not (dst.is_dir() and file_digest(dst) == file_digest(src)):
        with atomic_dir(dst) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    return str(dst)


def stage_inputs(cfg: TrainStageConfig, stage: Path) -> TrainStageConfig:
    """Copy what the nodes read into ``stage`` and return the config that points at the copies."""
    stage.mkdir(parents=True, exist_ok=True)
    _stage_file(Path(cfg.records), stage / STAGED_RECORDS)
    train = cfg.train
    if train.teacher_model:
        train = train.model_copy(update={"teacher_model": _stage_folder(train.teacher_model, stage / STAGED_TEACHER)})
    # The job trains where it runs: its own config must not launch another job.
    staged = cfg.model_copy(update={"records": str(stage / STAGED_RECORDS), "train": train, "launch": LaunchConfig(),
                                    "model": _stage_folder(cfg.model, stage / STAGED_MODEL)})
    write_json(stage / CONFIG_FILE, staged.model_dump())
    return staged


def checkpoint_progress(out_dir: Path, steps: int) -> str:
    """'step N/M' from the newest complete checkpoint the job has written, for the step's log."""
    root = checkpoint_root(out_dir)
    done = [int(m.group(1)) for p in (root.iterdir() if root.is_dir() else ())
            if (m := CHECKPOINT_RE.match(p.name)) and (p / "state.json").is_file()]
    return f"checkpoint at step {max(done)}/{steps}" if done else f"no checkpoint yet (of {steps} steps)"


def collect_outputs(job_out: Path, out_dir: Path) -> dict[str, Any]:
    """The job's model, log, curves and summary become this step's outputs (the model folder atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir / MODEL_DIR) as tmp:
        shutil.copytree(job_out / MODEL_DIR, tmp, dirs_exist_ok=True)
    for name in (TRAIN_LOG, CURVES, SUMMARY):
        _stage_file(job_out / name, out_dir / name)
    return json.loads((out_dir / SUMMARY).read_text())


def train_on_cluster(cfg: TrainStageConfig, out_dir: str | Path, pipeline_run_id: str,
                     launcher: JobLauncher | None = None, report: Callable[[str], None] | None = None
                     ) -> dict[str, Any]:
    """Run the training stage as a ``cfg.launch.kind`` job and return its summary, with the job named in it."""
    launch = cfg.launch
    report = report or _to_stderr  # stdout stays the command's JSON summary
    name, stage = workspace_stage(cfg, pipeline_run_id)
    staged = stage_inputs(cfg, stage)
    job_out = stage / OUT_DIR
    launcher = launcher or JobLauncher()
    namespace = launch.namespace or launcher.namespace
    manifest = job_manifest(name, namespace, launch, str(stage / CONFIG_FILE), str(job_out),
                            labels={LABEL_METHOD: cfg.train.method, LABEL_DIGEST: name.rsplit("-", 1)[1]},
                            owner=launching_pod_owner())
    ref = JobRef.of(manifest)
    outcome = launcher.submit(manifest, can_adopt=lambda: (job_out / SUMMARY).is_file())
    report(f"{outcome} {ref.kind} {namespace}/{name}: {launch.num_nodes} node(s) x {launch.procs_per_node} "
           f"process(es), workspace {stage}")
    n_steps = total_steps(staged.train, len({row["prompt_id"] for row in read_jsonl(staged.records)}))
    launcher.wait(ref, launch.timeout_s, launch.poll_s, report, progress=lambda: checkpoint_progress(job_out, n_steps))
    summary = collect_outputs(job_out, Path(out_dir))
    # The model is this step's output now; the staged inputs and checkpoints would only fill the volume.
    shutil.rmtree(stage, ignore_errors=True)
    summary["launch"] = {"kind": launch.kind, "job": name, "namespace": namespace, "nodes": launch.num_nodes,
                         "procs_per_node": launch.procs_per_node, "submitted": outcome}
    write_json(Path(out_dir) / SUMMARY, summary)
    return summary


def _config_digest(cfg: TrainStageConfig, launch: LaunchConfig) -> str:
    # The job's identity: what it trains and on what shape; polling settings and the timeout may change on a retry.
    shape = launch.model_dump(exclude={"timeout_s", "poll_s"})
    # The records' path is this pod's; their content is in the name through their digest.
    text = json.dumps({"train": cfg.model_dump(exclude={"records", "launch"}), "launch": shape}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def workspace_stage(cfg: TrainStageConfig, pipeline_run_id: str) -> tuple[str, Path]:
    """The job's name and its folder in the workspace: the same for every try of one step of one run."""
    digest = file_digest(Path(cfg.records))[:16] + "-" + _config_digest(cfg, cfg.launch)
    name = job_name(pipeline_run_id, cfg.train.method, digest)
    return name, Path(cfg.launch.workspace) / name


def train_in_workspace(cfg: TrainStageConfig, out_dir: str | Path, pipeline_run_id: str,
                       progress: bool = True) -> dict[str, Any]:
    """Train in this pod with the checkpoints in the shared workspace, so the retry of a preempted pod resumes
    from the newest complete one instead of step 0."""
    _, stage = workspace_stage(cfg, pipeline_run_id)
    staged = stage_inputs(cfg, stage)
    train_here(staged.model_copy(update={"launch": LaunchConfig(procs_per_node=cfg.launch.procs_per_node)}),
               stage / OUT_DIR, progress)
    summary = collect_outputs(stage / OUT_DIR, Path(out_dir))
    shutil.rmtree(stage, ignore_errors=True)
    return summary


def train_here(cfg: TrainStageConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """In this process, or under torchrun with ``launch.procs_per_node`` processes (one per GPU of this pod)."""
    procs = cfg.launch.procs_per_node
    if procs == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # already one of torchrun's processes
        return run_training(cfg, out_dir, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "torchrun_config.json"
    write_json(config_file, cfg.model_copy(update={"launch": LaunchConfig()}).model_dump())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               "-m", "caopd.cli", "train", "--config", str(config_file), "--out", str(out)]
    if not progress:
        command.append("--quiet")
    # This process logs the stage's MLflow run; rank 0 must not open a second one.
    child = subprocess.Popen(command, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))  # preemption: save
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code in (3, 143):  # stopped with a checkpoint to resume from (see caopd.errors.TrainingStopped)
        raise TrainingStopped(f"torchrun training stopped with exit code {code}; rerun to resume", code)
    if code:
        raise RuntimeError(f"torchrun training failed with exit code {code} (its processes' errors are above)")
    return json.loads((out / SUMMARY).read_text())


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_training_stage(cfg: TrainStageConfig, out_dir: str | Path, progress: bool = True,
                       pipeline_run_id: str = "") -> dict[str, Any]:
    """The training stage wherever ``cfg.launch`` puts it: in this process, under torchrun in this pod, in the
    shared workspace (checkpoints outlive the pod), or as a job on the cluster that this waits for."""
    # A base model from s3:// or the registry is fetched once, here: torchrun's processes and a job's nodes then
    # read the local copy (staged onto the workspace for a job), and the summary names where it came from.
    found: Found = {}
    cfg = cfg.model_copy(update={"model": model_path(cfg.model, "model", found)})
    if cfg.launch.kind != "local":
        summary = train_on_cluster(cfg, out_dir, pipeline_run_id)
    elif cfg.launch.workspace_pvc:
        summary = train_in_workspace(cfg, out_dir, pipeline_run_id, progress)
    else:
        summary = train_here(cfg, out_dir, progress)
    summary["sources"] = found
    write_json(Path(out_dir) / SUMMARY, summary)
    return summary
