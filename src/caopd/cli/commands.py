"""What each ``caopd`` command does: build its config from the parsed flags, call the library, print the result.
Library imports stay inside the commands, so that ``caopd --help`` loads neither torch nor transformers."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from caopd.cli.options import config_from_args
from caopd.config.stages import (
    CALIBRATION_EVALUATION,
    DATA_PREPARATION,
    OPD_TRAINING,
    ROLLOUT_ESTIMATION,
    TARGET_REPLACEMENT,
)
from caopd.errors import CaopdInputError


# --- commands -----------------------------------------------------------------------------------
def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str, allow_nan=True))


def cmd_metrics(args: argparse.Namespace) -> int:
    from caopd.evaluation.metrics import calibration_metrics, load_predictions

    confidences, correct = load_predictions(args.file)
    result = calibration_metrics(confidences, correct)
    print(json.dumps({k: (None if isinstance(v, float) and v != v else v) for k, v in result.items()}))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from caopd.io import write_jsonl
    from caopd.tasks.toolalpaca import convert_toolalpaca

    if not args.out.endswith(".jsonl"):
        raise CaopdInputError("the rows are written as JSON lines: give a .jsonl file", file=args.out, field="--out")
    rows = convert_toolalpaca(args.file)
    write_jsonl(args.out, rows)
    _print_json({"rows": len(rows), "apis": len({row["name"] for row in rows}), "out": args.out})
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from caopd.config.scoring import ScoreConfig
    from caopd.evaluation.tables import print_comparison
    from caopd.stages.score import run_scoring

    summary = run_scoring(config_from_args(ScoreConfig, args), args.out)
    print_comparison(summary["arms"])
    print(f"summary: {Path(args.out) / 'summary.json'}")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from caopd.config.experiments import RouteConfig
    from caopd.experiments.routing import run_routing

    small = {}
    for spec in args.small:
        name, sep, path = spec.partition("=")
        small[name if sep else Path(spec).stem] = path if sep else spec
    cfg = RouteConfig(small=small, large=args.large, large_accuracy=args.large_accuracy, small_cost=args.small_cost,
                      large_cost=args.large_cost, target_accuracy=args.target_accuracy)
    summary = run_routing(cfg, args.out)
    _print_json({"large_accuracy": summary["large_accuracy"], "small": summary["small"], "out": args.out})
    return 0


def _tracker(args: argparse.Namespace, required: bool = False):
    """The MLflow tracker for a stage command: only with a tracking URI (flag or environment) unless required."""
    from caopd.tracking.stage_runs import tracker_if_configured

    settings = {"tracking_uri": args.tracking_uri or "", "experiment": args.experiment,
                "artifact_root": args.artifact_root or ""}
    return tracker_if_configured(settings, args.pipeline_run_id or "", args.mlflow_dir, required=required)


def _tracked(args: argparse.Namespace, stage: str, cfg: Any, run: Callable[[], dict], out: str, inputs=(),
             tags=None) -> dict:
    from caopd.tracking.stage_runs import tracked

    return tracked(_tracker(args), stage, cfg, run, out, inputs, tags)


def cmd_rollout(args: argparse.Namespace) -> int:
    from caopd.config.stages import RolloutConfig
    from caopd.stages.estimate import run_rollout_estimation

    cfg = config_from_args(RolloutConfig, args)
    summary = _tracked(args, ROLLOUT_ESTIMATION.id, cfg,
                       lambda: run_rollout_estimation(cfg, args.out, progress=not args.quiet), args.out,
                       inputs={"train": (cfg.data, "training")})
    _print_json({"n_prompts": summary["n_prompts"], "skipped_too_long": summary["skipped_too_long"],
                 "base_metrics": summary["base_metrics"]})
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from caopd.config.stages import TargetsConfig
    from caopd.stages.targets import run_target_replacement
    from caopd.tracking.tracker import TAG_METHOD

    cfg = config_from_args(TargetsConfig, args)
    summary = _tracked(args, TARGET_REPLACEMENT.id, cfg, lambda: run_target_replacement(cfg, args.out), args.out,
                       tags={TAG_METHOD: cfg.method})
    _print_json({k: summary[k] for k in ("n_prompts", "n_records", "teacher_modes", "mean_target_confidence")})
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from caopd.config.stages import TrainStageConfig
    from caopd.launch.remote import run_training_stage
    from caopd.models.distributed import process_rank
    from caopd.stages.train import run_training
    from caopd.tracking.tracker import TAG_METHOD

    cfg = config_from_args(TrainStageConfig, args)
    if process_rank() > 0:  # under torchrun: one MLflow run and one printed summary, from rank 0
        run_training(cfg, args.out, progress=False)
        return 0
    # A job launched from a shell is new each time; a pipeline's retry passes its run id and adopts its job.
    run_id = args.pipeline_run_id or uuid.uuid4().hex
    summary = _tracked(args, OPD_TRAINING.id, cfg, lambda: run_training_stage(cfg, args.out, not args.quiet, run_id),
                       args.out, inputs={"records": (cfg.records, "training")}, tags={TAG_METHOD: cfg.train.method})
    _print_json({"steps": summary["steps"], "seconds": summary["seconds"], "final": summary["final"]})
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from caopd.config.stages import EvaluateConfig
    from caopd.evaluation.tables import print_comparison
    from caopd.stages.evaluate import run_evaluation

    cfg = config_from_args(EvaluateConfig, args)
    summary = _tracked(args, CALIBRATION_EVALUATION.id, cfg,
                       lambda: run_evaluation(cfg, args.out, progress=not args.quiet), args.out,
                       inputs={"eval": (cfg.data, "evaluation")})
    print_comparison(summary["arms"])
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from caopd.config.stages import RegisterConfig
    from caopd.stages.register import run_registration

    metrics = {}
    if args.metrics:
        summary = json.loads(Path(args.metrics).read_text())
        metrics = summary["arms"][args.arm] if "arms" in summary else summary
    cfg = config_from_args(RegisterConfig, args, metrics=metrics)
    record = run_registration(cfg, _tracker(args, required=True))
    _print_json({k: record[k] for k in ("name", "version", "created", "source", "decision", "pipeline_run_id")})
    return 0


def _registry(args: argparse.Namespace) -> tuple[str, Any]:
    """(URI, client) of the registry the flags or the environment name, else the local store: promotion and
    lineage log no run, so they need no experiment of their own (a reader may hold none to write to)."""
    from caopd.config.tracking import TrackingConfig
    from caopd.tracking.tracker import connect, resolve_tracking_uri

    cfg = TrackingConfig(tracking_uri=args.tracking_uri or "")
    uri = resolve_tracking_uri(cfg, args.mlflow_dir)
    return uri, connect(uri, cfg.connect_timeout_s)


def cmd_promote(args: argparse.Namespace) -> int:
    from caopd.config.gates import GateConfig
    from caopd.tracking.registry import promote

    uri, client = _registry(args)
    gates = config_from_args(GateConfig, args)
    _print_json(promote(client, args.name, args.to, gates, args.version, uri))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from caopd.tracking.registry import lineage

    uri, client = _registry(args)
    chain = lineage(client, args.reference, uri)
    if args.json:
        _print_json(chain)
        return 0
    print("datasets: " + ", ".join(f"{k} {v[:12]}" for k, v in chain["datasets"].items()))
    print(f"base model: {chain['base_model']}")
    if chain.get("sources"):
        print("sources: " + ", ".join(f"{role} {found['source']} {found.get('sha256', '')[:12]}"
                                      for role, found in chain["sources"].items()))
    for step in chain["runs"]:
        shown = {k: round(v, 4) for k, v in step["metrics"].items() if not k.startswith(("base_", "opd_"))}
        print(f"  -> {step['stage']} run {step['run_id']}: {dict(list(shown.items())[:8])}")
    version = chain["version"]
    print(f"  -> {version['name']} version {version['version']} {version['aliases']} {version['source']}: "
          f"{ {k: round(v, 4) for k, v in version['metrics'].items()} }")
    return 0


def cmd_bootstrap_auth(args: argparse.Namespace) -> int:
    import os

    from caopd.config.tracking import TrackingConfig
    from caopd.tracking.bootstrap import ROLES, bootstrap
    from caopd.tracking.identity import load_credentials, read_credentials_dir

    uri = TrackingConfig(tracking_uri=args.tracking_uri or "").tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise CaopdInputError("needs the MLflow server's http(s) URL (or $MLFLOW_TRACKING_URI)", field="--tracking-uri")
    load_credentials()
    identities = {role: read_credentials_dir(folder) for role in ROLES
                  if (folder := getattr(args, f"{role}_credentials"))}
    _print_json(bootstrap(uri, args.experiment, args.model, identities, args.connect_timeout_s))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from caopd.config.run import RunConfig
    from caopd.kfp.local import run_main_job

    summary = run_main_job(config_from_args(RunConfig, args), args.out, progress=not args.quiet)
    print(f"summary: {Path(args.out) / 'summary.json'}  ({summary['seconds']:.0f} s)")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from caopd.config.launch import check_secret_env
    from caopd.config.tracking import PASSWORD_ENV, USERNAME_ENV
    from caopd.pipelines import compile_pipeline

    secret_env = {USERNAME_ENV: f"{args.mlflow_secret}/username", PASSWORD_ENV: f"{args.mlflow_secret}/password"} \
        if args.mlflow_secret else {}
    for pair in args.secret_env or []:
        name, sep, ref = pair.partition("=")
        if not sep:
            raise CaopdInputError(f"{pair!r}: write it as NAME=SECRET/KEY", field="--secret-env")
        secret_env[name] = ref
    try:
        check_secret_env(secret_env)
    except ValueError as err:
        raise CaopdInputError(str(err), field="--secret-env") from None
    print(compile_pipeline(args.out, workspace_pvc=args.workspace_pvc or "", secret_env=secret_env))
    return 0


def _target(args: argparse.Namespace):
    from caopd.kfp.submit import Target, parse_params, pipeline_parameters
    from caopd.pipelines import COMPILED_PIPELINE, PIPELINE_NAME

    spec = Path(args.pipeline_file) if args.pipeline_file else COMPILED_PIPELINE
    return Target(spec_path=spec, pipeline_name=args.pipeline_name or PIPELINE_NAME, experiment=args.experiment,
                  params=parse_params(args.param or [], pipeline_parameters(spec)))


def cmd_submit(args: argparse.Namespace) -> int:
    from caopd.kfp.submit import read_token, submit

    target = _target(args)
    _print_json(submit(args.host, target, read_token(args.token_file), args.namespace))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from caopd.kfp.submit import read_token, schedule

    target = _target(args)
    _print_json(schedule(args.host, target, args.cron, read_token(args.token_file), args.namespace, args.name))
    return 0


def cmd_pretrain_tiny(args: argparse.Namespace) -> int:
    from caopd.config.pretrain import PretrainConfig
    from caopd.training.pretrain import pretrain_tiny

    record = pretrain_tiny(args.out, config_from_args(PretrainConfig, args), progress=not args.quiet)
    _print_json({k: record[k] for k in ("final_loss", "greedy_accuracy_by_kind", "seconds")})
    return 0


def cmd_build_standin(args: argparse.Namespace) -> int:
    from caopd.config.standin import StandinConfig
    from caopd.training.standin import build_standin

    summary = build_standin(config_from_args(StandinConfig, args), args.out, progress=not args.quiet)
    _print_json({k: summary[k] for k in ("out_dir", "parameters", "tokenizer_size", "final_loss", "seconds")})
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from caopd.config.stages import EVAL, TRAIN, DataConfig
    from caopd.stages.prepare import run_data_preparation

    cfg = config_from_args(DataConfig, args)
    out = Path(args.out)
    summary = _tracked(args, DATA_PREPARATION.id, cfg, lambda: run_data_preparation(cfg, out), args.out,
                       inputs={"train": (out / TRAIN, "training"), "eval": (out / EVAL, "evaluation")})
    _print_json({k: summary[k] for k in ("n_train", "n_eval", "outputs")})
    return 0


def cmd_continual(args: argparse.Namespace) -> int:
    from caopd.config.experiments import ContinualConfig
    from caopd.experiments.continual import forgetting_table, run_continual

    summary = run_continual(config_from_args(ContinualConfig, args), args.out)
    print(forgetting_table(summary["forgetting"]), end="")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from caopd.config.experiments import CompareConfig
    from caopd.experiments.compare import paper_table, run_compare

    summary = run_compare(config_from_args(CompareConfig, args), args.out, progress=not args.quiet)
    for set_name, arms in summary["sets"].items():
        print(f"{set_name}:\n{paper_table(arms)}")
    print(f"report: {Path(args.out) / 'report.md'} ({summary['seconds']:.0f} s)")
    return 0



def cmd_plan(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from caopd.config.engines import GIB
    from caopd.config.memory import plan_rows, plan_run, resolve_model_config
    from caopd.models.packaged import PACKAGED_MODELS

    if args.gpus < 1 or args.gpu_memory_gib <= 0:
        raise CaopdInputError("give at least one GPU and its memory in GiB", field="--gpus/--gpu-memory-gib")
    config, parameters, source = resolve_model_config(args.model, PACKAGED_MODELS)
    settings = {key: getattr(args, key) for key in ("preset", "precision", "finetune", "sharding", "engine", "k",
                                                    "prompts_per_step", "micro_batch_size", "max_prompt_tokens",
                                                    "max_new_tokens", "activation_checkpointing", "lora_r",
                                                    "teacher")}
    gpu_bytes = int(args.gpu_memory_gib * GIB)
    run = plan_run(config, parameters, args.gpus, gpu_bytes, settings, source)
    header, rows = plan_rows(run, gpu_bytes)
    plan = run.train
    table = Table(title=f"{args.model}: GiB per GPU on {args.gpus} × {args.gpu_memory_gib:g} GiB ({plan.sharding}, "
                  f"{plan.precision}, {plan.finetune}, micro-batch {plan.micro_batch_size}, activation "
                  f"checkpointing {'on' if plan.activation_checkpointing else 'off'}, {plan.max_prompt_tokens} + "
                  f"{plan.max_new_tokens} tokens)", box=box.SIMPLE_HEAD)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    print(f"model config: {source}")
    for stage in run.stages:
        if stage.detail:
            print(f"{stage.stage}: {stage.detail}")
    if run.refusal:
        raise CaopdInputError(run.refusal)
    return 0
