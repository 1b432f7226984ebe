"""``caopd`` — the command line. It parses, calls one stage of the library, and prints.

Options are generated from each stage's typed config, so the help text and the validation are the
config's own; nested fields are written with dots (``--train.lr 1e-4``, ``--sampling.temperature 0.7``).
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from caopd.config.stages import (
    CALIBRATION_EVALUATION,
    DATA_PREPARATION,
    OPD_TRAINING,
    ROLLOUT_ESTIMATION,
    TARGET_REPLACEMENT,
)
from caopd.errors import (
    CaopdInputError,
    CaopdServiceError,
    TrainingJobFailed,
    TrainingStopped,
)

EXIT_BAD_INPUT, EXIT_SERVICE = 2, 1


# --- options from pydantic configs -------------------------------------------------------------
def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = "",
                       skip: tuple[str, ...] = ()) -> None:
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        dest = f"{prefix}{name}"
        if _is_model(field.annotation):
            _add_model_options(parser, field.annotation, prefix=f"{dest}.")
            continue
        flag = "--" + dest.replace("_", "-")
        default = "required" if field.is_required() else f"default: {field.get_default(call_default_factory=True)}"
        help_text = f"{field.description or ''} ({default})".replace("%", "%%")
        origin = typing.get_origin(field.annotation)
        if origin is dict:
            parser.add_argument(flag, dest=f"cfg:{dest}", nargs="+", metavar="NAME=VALUE", help=help_text)
        elif origin is list:
            parser.add_argument(flag, dest=f"cfg:{dest}", nargs="+", metavar=name.upper(), help=help_text)
        else:
            parser.add_argument(flag, dest=f"cfg:{dest}", metavar=name.upper(), help=help_text)


def _config_from_args(model: type[BaseModel], args: argparse.Namespace, **fixed: Any) -> Any:
    """Build the config from ``--config FILE`` (JSON), then the flags given, then ``fixed`` values."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CaopdInputError(f"cannot read config: {err}", file=str(path)) from None
    for key, value in vars(args).items():
        if not key.startswith("cfg:") or value is None:
            continue
        path_parts = key[4:].split(".")
        if typing.get_origin(_field_annotation(model, path_parts)) is dict:
            bad = [item for item in value if "=" not in item]
            if bad:
                raise CaopdInputError(f"expected NAME=VALUE, got {bad[0]!r}", field=key[4:])
            value = dict(item.split("=", 1) for item in value)
        elif isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        node = data
        for part in path_parts[:-1]:
            node = node.setdefault(part, {})
        node[path_parts[-1]] = value
    data.update(fixed)
    return model.model_validate(data)


def _field_annotation(model: type[BaseModel], parts: list[str]) -> Any:
    annotation: Any = model
    for part in parts:
        annotation = annotation.model_fields[part].annotation
    return annotation


# --- commands -----------------------------------------------------------------------------------
def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str, allow_nan=True))


def cmd_metrics(args: argparse.Namespace) -> int:
    from caopd.evaluation.metrics import calibration_metrics, load_predictions

    confidences, correct = load_predictions(args.file)
    result = calibration_metrics(confidences, correct)
    print(json.dumps({k: (None if isinstance(v, float) and v != v else v) for k, v in result.items()}))
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

    cfg = _config_from_args(RolloutConfig, args)
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

    cfg = _config_from_args(TargetsConfig, args)
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

    cfg = _config_from_args(TrainStageConfig, args)
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

    cfg = _config_from_args(EvaluateConfig, args)
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
    cfg = _config_from_args(RegisterConfig, args, metrics=metrics)
    record = run_registration(cfg, _tracker(args, required=True))
    _print_json({k: record[k] for k in ("name", "version", "created", "source", "decision", "pipeline_run_id")})
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from caopd.config.gates import GateConfig
    from caopd.tracking.registry import promote

    tracker = _tracker(args, required=True)
    gates = _config_from_args(GateConfig, args)
    _print_json(promote(tracker.client, args.name, args.to, gates, args.version, tracker.uri))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from caopd.tracking.registry import lineage

    tracker = _tracker(args, required=True)
    chain = lineage(tracker.client, args.reference, tracker.uri)
    if args.json:
        _print_json(chain)
        return 0
    print("datasets: " + ", ".join(f"{k} {v[:12]}" for k, v in chain["datasets"].items()))
    print(f"base model: {chain['base_model']}")
    for step in chain["runs"]:
        shown = {k: round(v, 4) for k, v in step["metrics"].items() if not k.startswith(("base_", "opd_"))}
        print(f"  -> {step['stage']} run {step['run_id']}: {dict(list(shown.items())[:8])}")
    version = chain["version"]
    print(f"  -> {version['name']} version {version['version']} {version['aliases']} {version['source']}: "
          f"{ {k: round(v, 4) for k, v in version['metrics'].items()} }")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from caopd.config.run import RunConfig
    from caopd.kfp.local import run_main_job

    summary = run_main_job(_config_from_args(RunConfig, args), args.out, progress=not args.quiet)
    print(f"summary: {Path(args.out) / 'summary.json'}  ({summary['seconds']:.0f} s)")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from caopd.pipelines import compile_pipeline

    print(compile_pipeline(args.out, workspace_pvc=args.workspace_pvc or ""))
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


TRACKED_COMMANDS = ("prepare", "rollout", "targets", "train", "evaluate", "register")


def _add_tracking_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI; stage commands "
                   "track only when one is set)")
    p.add_argument("--experiment", default="caopd", help="MLflow experiment (default: caopd)")
    p.add_argument("--pipeline-run-id", help="groups the stage runs under one parent run (default: a new id)")
    p.add_argument("--artifact-root", help="where a new experiment keeps artifacts, e.g. s3://bucket/caopd")
    p.add_argument("--mlflow-dir", default="mlflow", help="local MLflow store (SQLite) when no tracking URI is set; "
                   "registry commands use it (default: ./mlflow)")


def _add_kfp_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="the KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="a pipeline parameter (repeatable); typed and checked against the compiled spec")
    p.add_argument("--experiment", default="caopd", help="KFP experiment (created if missing; default: caopd)")
    p.add_argument("--pipeline-name", help="pipeline name in KFP (default: caopd)")
    p.add_argument("--pipeline-file", help="compiled spec to upload (default: the packaged caopd_pipeline.yaml)")
    p.add_argument("--namespace", help="profile namespace on a multi-user Kubeflow")
    p.add_argument("--token-file", help="file holding the bearer token (default: $KFP_TOKEN, else the "
                   "service-account token KFP mounts in pods); never pass the token itself")


def cmd_pretrain_tiny(args: argparse.Namespace) -> int:
    from caopd.config.pretrain import PretrainConfig
    from caopd.training.pretrain import pretrain_tiny

    record = pretrain_tiny(args.out, _config_from_args(PretrainConfig, args), progress=not args.quiet)
    _print_json({k: record[k] for k in ("final_loss", "greedy_accuracy_by_kind", "seconds")})
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from caopd.config.stages import EVAL, TRAIN, DataConfig
    from caopd.stages.prepare import run_data_preparation

    cfg = _config_from_args(DataConfig, args)
    out = Path(args.out)
    summary = _tracked(args, DATA_PREPARATION.id, cfg, lambda: run_data_preparation(cfg, out), args.out,
                       inputs={"train": (out / TRAIN, "training"), "eval": (out / EVAL, "evaluation")})
    _print_json({k: summary[k] for k in ("n_train", "n_eval", "outputs")})
    return 0


def cmd_continual(args: argparse.Namespace) -> int:
    from caopd.config.experiments import ContinualConfig
    from caopd.experiments.continual import forgetting_table, run_continual

    summary = run_continual(_config_from_args(ContinualConfig, args), args.out)
    print(forgetting_table(summary["forgetting"]), end="")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from caopd.config.experiments import CompareConfig
    from caopd.experiments.compare import paper_table, run_compare

    summary = run_compare(_config_from_args(CompareConfig, args), args.out, progress=not args.quiet)
    for set_name, arms in summary["sets"].items():
        print(f"{set_name}:\n{paper_table(arms)}")
    print(f"report: {Path(args.out) / 'report.md'} ({summary['seconds']:.0f} s)")
    return 0


def _commands() -> list[tuple[str, str, Callable, Any, str]]:
    from caopd.config.experiments import CompareConfig, ContinualConfig
    from caopd.config.pretrain import PretrainConfig
    from caopd.config.run import RunConfig
    from caopd.config.stages import (
        DataConfig,
        EvaluateConfig,
        RegisterConfig,
        RolloutConfig,
        TargetsConfig,
        TrainStageConfig,
    )

    return [
        ("run", "the main job: base, plain OPD and CaOPD, evaluated side by side", cmd_run, RunConfig,
         "examples:\n  caopd run --out runs/demo\n  caopd run --out runs/seed1 --seed 1 --train.steps 100"),
        ("prepare", "stage 0: the train and eval prompt sets (your datasets, validated, or synthetic arithmetic)",
         cmd_prepare, DataConfig, "examples:\n  caopd prepare --out runs/data --n-train 2000 --n-eval 2000\n"
         "  caopd prepare --out runs/data --task mcq --train-source train.parquet --eval-source eval.parquet"),
        ("rollout", "stage 1: K rollouts per prompt, verified; P = correct/K", cmd_rollout, RolloutConfig,
         "example:\n  caopd rollout --data train.jsonl --k 8 --out runs/rollouts"),
        ("targets", "stage 2: target replacement (CaOPD's three edits, or plain OPD)", cmd_targets, TargetsConfig,
         "example:\n  caopd targets --data train.jsonl --rollouts runs/rollouts/rollouts.jsonl \\\n"
         "      --estimates runs/rollouts/estimates.jsonl --method caopd --out runs/targets"),
        ("train", "stage 3: on-policy distillation training", cmd_train, TrainStageConfig,
         "example:\n  caopd train --records runs/targets/records.jsonl --train.method caopd \\\n"
         "      --train.steps 200 --out runs/train"),
        ("evaluate", "stage 4: calibration evaluation of one or more models", cmd_evaluate, EvaluateConfig,
         "example:\n  caopd evaluate --models base=tiny caopd=runs/train/model --data eval.jsonl --out runs/eval"),
        ("register", "stage 5: register a trained model in a local registry", cmd_register, RegisterConfig,
         "examples:\n  caopd register --model-dir runs/train/model --metrics runs/eval/summary.json --arm caopd \\\n"
         "      --mlflow-dir runs/mlflow\n"
         "  caopd register --model-dir runs/train/model --metrics runs/eval/summary.json \\\n"
         "      --tracking-uri http://mlflow:5000 --name caopd-qwen3-8b --base-model Qwen/Qwen3-8B"),
        ("compare", "baselines in one command: base, OPD (SDFT- and SDPO-style teachers), CaOPD in both teacher "
         "modes and RLCR, in-domain and OOD, with bootstrap intervals", cmd_compare, CompareConfig,
         "examples:\n  caopd compare --out runs/compare\n"
         "  caopd compare --out runs/compare --arms opd_demo caopd_demo rlcr --ood-kinds mul_2x2"),
        ("continual", "calibration forgetting: train on task A, then on task B; ECE on A before and after",
         cmd_continual, ContinualConfig, "examples:\n  caopd continual --out runs/continual\n"
         "  caopd continual --out runs/continual --task-a-kinds add_2x1 add_2x2 --task-b-kinds mul_2x1 mul_2x2"),
        ("pretrain-tiny", "regenerate the packaged tiny base model (deterministic)", cmd_pretrain_tiny,
         PretrainConfig, "example:\n  caopd pretrain-tiny --out tiny_checkpoint"),
    ]


def build_parser() -> argparse.ArgumentParser:
    from caopd.config.gates import GateConfig

    parser = argparse.ArgumentParser(prog="caopd", description="Calibration-Aware On-Policy Distillation.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, func, config, epilog in _commands():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        needs_out = name not in ("register",)
        if needs_out:
            p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--config", help="a JSON file with the config; flags override it")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "register":
            p.add_argument("--metrics", help="an evaluation summary.json (or a metrics JSON) to record")
            p.add_argument("--arm", default="caopd", help="which arm of the evaluation summary (default: caopd)")
        if name in TRACKED_COMMANDS:
            _add_tracking_options(p)
        _add_model_options(p, config, skip=("metrics",) if name == "register" else ())
        p.set_defaults(func=func)
    pr = sub.add_parser("promote", help="move an alias (champion) onto the challenger after checking the gates",
                        description="Check the gates of the challenger (or --version) against the model holding "
                        "the alias now, record the decision on the version, and move the alias if they pass.",
                        epilog="example:\n  caopd promote caopd-tiny --to champion --tracking-uri http://mlflow:5000",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("name", help="registered model name")
    pr.add_argument("--to", default="champion", help="the alias to move (default: champion)")
    pr.add_argument("--version", type=int, help="the version to promote (default: the challenger)")
    _add_tracking_options(pr)
    _add_model_options(pr, GateConfig, prefix="")
    pr.set_defaults(func=cmd_promote)
    li = sub.add_parser("lineage", help="datasets -> rollout -> training -> evaluation -> model version",
                        description="Print the chain behind a model version, with the key metrics of each step.",
                        epilog="examples:\n  caopd lineage caopd-tiny@champion\n  caopd lineage caopd-tiny/3 --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    li.add_argument("reference", help="NAME@ALIAS or NAME/VERSION")
    li.add_argument("--json", action="store_true", help="print the chain as JSON")
    _add_tracking_options(li)
    li.set_defaults(func=cmd_lineage)
    c = sub.add_parser("compile", help="write the compiled KFP pipeline spec (YAML)",
                       description="Compile the pipeline to the YAML a KFP server or the Kubeflow UI uploads.",
                       epilog="examples:\n  caopd compile --out caopd_pipeline.yaml\n"
                       "  caopd compile --out caopd_pipeline.yaml --workspace-pvc caopd-workspace",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--out", required=True, help="the YAML file to write")
    c.add_argument("--workspace-pvc", help="a ReadWriteMany PVC mounted on the training step: checkpoints outlive "
                   "the pod, and train_launch may start TrainJobs / PyTorchJobs (the chart's workspace creates one)")
    c.set_defaults(func=cmd_compile)
    s_ = sub.add_parser("submit", help="upload the pipeline (new version if changed) and start a run on KFP",
                        description="Upload the compiled pipeline to a KFP server (a new version when the spec "
                        "changed) and start a run.",
                        epilog="example:\n  KFP_TOKEN=... caopd submit --host https://kubeflow.example.com/pipeline "
                        "\\\n      --param base_model=Qwen/Qwen3-8B --param steps=500 --param accelerator_count=1",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_kfp_options(s_)
    s_.set_defaults(func=cmd_submit)
    r = sub.add_parser("schedule", help="create a recurring run of the pipeline on KFP",
                       description="Upload the compiled pipeline (as submit does) and create a recurring run.",
                       epilog="example (every Sunday 03:00):\n  caopd schedule --host https://kubeflow.example.com/"
                       "pipeline --token-file /secrets/kfp-token \\\n      --cron '0 0 3 * * 0'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_kfp_options(r)
    r.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 3 * * 0' = Sundays at 03:00")
    r.add_argument("--name", help="recurring run name (default: the pipeline name and the cron)")
    r.set_defaults(func=cmd_schedule)
    m = sub.add_parser("metrics", help="calibration metrics of a predictions JSONL file",
                       description="Print accuracy, ECE, Brier, AUROC, SPR, mean confidence, overconfidence gap "
                       "and missing rate of FILE, one JSON object.",
                       epilog='FILE: one {"confidence": float|null, "correct": bool} per line.\n'
                              "example:\n  caopd metrics runs/demo/evaluation/predictions_caopd.jsonl",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("file")
    m.set_defaults(func=cmd_metrics)
    ro = sub.add_parser("route", help="cascade routing: when to call the large model, from the small one's confidence",
                        description="Sweep the confidence threshold below which a prompt goes to the large model; "
                        "report accuracy against cost, the cheapest threshold reaching --target-accuracy and its "
                        "saving against calling the large model on every prompt (routing.json, .md, .png).",
                        epilog="example (the tiny default has no large model; state its accuracy):\n"
                               "  caopd route --small caopd=runs/demo/evaluation/predictions_caopd.jsonl \\\n"
                               "      --small opd=runs/demo/evaluation/predictions_opd.jsonl \\\n"
                               "      --large-accuracy 0.95 --large-cost 10 --target-accuracy 0.85 --out runs/route",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ro.add_argument("--small", action="append", required=True, metavar="[NAME=]FILE",
                    help="a small model's predictions JSONL (prompt_id, confidence, correct); repeat to compare")
    ro.add_argument("--large", help="the large model's predictions JSONL on the same prompts")
    ro.add_argument("--large-accuracy", type=float, help="the large model's accuracy, instead of its predictions")
    ro.add_argument("--small-cost", type=float, default=1.0, help="cost of one small-model call (default 1)")
    ro.add_argument("--large-cost", type=float, default=10.0, help="cost of one large-model call (default 10)")
    ro.add_argument("--target-accuracy", type=float, required=True, help="the accuracy the cascade must reach")
    ro.add_argument("--out", required=True, help="folder for routing.json, routing.md and routing.png")
    ro.set_defaults(func=cmd_route)
    return parser


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid config: field '{where}': {first['msg']}{more}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CaopdInputError as err:
        print(f"caopd: error: {err}", file=sys.stderr)
    except ValidationError as err:
        print(f"caopd: error: {_one_line(err)}", file=sys.stderr)
    except (CaopdServiceError, TrainingJobFailed) as err:
        print(f"caopd: error: {err}", file=sys.stderr)
        return EXIT_SERVICE
    except TrainingStopped as err:  # preempted (143, like a process SIGTERM ends) or a non-finite loss (3)
        print(f"caopd: stopped: {err}", file=sys.stderr)
        return err.exit_code
    return EXIT_BAD_INPUT

