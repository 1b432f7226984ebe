"""``caopd`` — the command line. It parses, calls one stage of the library, and prints.

Options are generated from each stage's typed config, so the help text and the validation are the
config's own; nested fields are written with dots (``--train.lr 1e-4``, ``--sampling.temperature 0.7``).
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from caopd.errors import CaopdInputError

EXIT_BAD_INPUT = 2


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
            parser.add_argument(flag, dest=f"cfg:{dest}", nargs="+", help=help_text)
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
    from caopd.metrics import calibration_metrics, load_predictions

    confidences, correct = load_predictions(args.file)
    result = calibration_metrics(confidences, correct)
    print(json.dumps({k: (None if isinstance(v, float) and v != v else v) for k, v in result.items()}))
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from caopd.stages.estimate import RolloutConfig, run_rollout_estimation

    summary = run_rollout_estimation(_config_from_args(RolloutConfig, args), args.out, progress=not args.quiet)
    _print_json({"n_prompts": summary["n_prompts"], "skipped_too_long": summary["skipped_too_long"],
                 "base_metrics": summary["base_metrics"]})
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from caopd.stages.targets import TargetsConfig, run_target_replacement

    summary = run_target_replacement(_config_from_args(TargetsConfig, args), args.out)
    _print_json({k: summary[k] for k in ("n_prompts", "n_records", "teacher_modes", "mean_target_confidence")})
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from caopd.stages.train import TrainStageConfig, run_training

    summary = run_training(_config_from_args(TrainStageConfig, args), args.out, progress=not args.quiet)
    _print_json({"steps": summary["steps"], "seconds": summary["seconds"], "final": summary["final"]})
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from caopd.report import print_comparison
    from caopd.stages.evaluate import EvaluateConfig, run_evaluation

    summary = run_evaluation(_config_from_args(EvaluateConfig, args), args.out, progress=not args.quiet)
    print_comparison(summary["arms"])
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from caopd.stages.register import RegisterConfig, run_registration

    metrics = {}
    if args.metrics:
        summary = json.loads(Path(args.metrics).read_text())
        metrics = summary["arms"][args.arm] if "arms" in summary else summary
    record = run_registration(_config_from_args(RegisterConfig, args, metrics=metrics))
    _print_json({k: record[k] for k in ("name", "version", "path", "created")})
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from caopd.runner import RunConfig, run_main_job

    summary = run_main_job(_config_from_args(RunConfig, args), args.out, progress=not args.quiet)
    print(f"summary: {Path(args.out) / 'summary.json'}  ({summary['seconds']:.0f} s)")
    return 0


def cmd_pretrain_tiny(args: argparse.Namespace) -> int:
    from caopd.models.pretrain import PretrainConfig, pretrain_tiny

    record = pretrain_tiny(args.out, _config_from_args(PretrainConfig, args), progress=not args.quiet)
    _print_json({k: record[k] for k in ("final_loss", "greedy_accuracy_by_kind", "seconds")})
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from caopd.stages.prepare import DataConfig, run_data_preparation

    summary = run_data_preparation(_config_from_args(DataConfig, args), args.out)
    _print_json({k: summary[k] for k in ("n_train", "n_eval", "outputs")})
    return 0


def _commands() -> list[tuple[str, str, Callable, Any, str]]:
    from caopd.models.pretrain import PretrainConfig
    from caopd.runner import RunConfig
    from caopd.stages.estimate import RolloutConfig
    from caopd.stages.prepare import DataConfig
    from caopd.stages.evaluate import EvaluateConfig
    from caopd.stages.register import RegisterConfig
    from caopd.stages.targets import TargetsConfig
    from caopd.stages.train import TrainStageConfig

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
         "example:\n  caopd register --model-dir runs/train/model --registry-dir runs/registry \\\n"
         "      --metrics runs/eval/summary.json --arm caopd"),
        ("pretrain-tiny", "regenerate the packaged tiny base model (deterministic)", cmd_pretrain_tiny,
         PretrainConfig, "example:\n  caopd pretrain-tiny --out tiny_checkpoint"),
    ]


def build_parser() -> argparse.ArgumentParser:
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
        _add_model_options(p, config, skip=("metrics",) if name == "register" else ())
        p.set_defaults(func=func)
    m = sub.add_parser("metrics", help="calibration metrics of a predictions JSONL file",
                       description="Print accuracy, ECE, Brier, AUROC, SPR, mean confidence, overconfidence gap "
                       "and missing rate of FILE, one JSON object.",
                       epilog='FILE: one {"confidence": float|null, "correct": bool} per line.\n'
                              "example:\n  caopd metrics runs/demo/evaluation/predictions_caopd.jsonl",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("file")
    m.set_defaults(func=cmd_metrics)
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
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
