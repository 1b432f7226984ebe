"""Command-line options from the typed configs: one flag per field (nested fields with dots, ``--train.lr``), its
help text the field's own, and the config rebuilt and validated from the parsed flags."""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from caopd.errors import CaopdInputError


# --- options from pydantic configs -------------------------------------------------------------
def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def add_config_options(parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = "",
                       skip: tuple[str, ...] = ()) -> None:
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        dest = f"{prefix}{name}"
        if _is_model(field.annotation):
            add_config_options(parser, field.annotation, prefix=f"{dest}.")
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


def config_from_args(model: type[BaseModel], args: argparse.Namespace, **fixed: Any) -> Any:
    """Build the config from ``--preset NAME``, then ``--config FILE`` (JSON), then the flags given, then ``fixed``
    values: each later source wins (a preset's setting that would contradict a given one steps aside)."""
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
    preset = getattr(args, "preset", None)
    if preset and "preset" not in model.model_fields:  # a run config carries its preset as a field of its own
        from caopd.config.presets import merge_over_preset, preset_config

        data = merge_over_preset(preset_config(preset, model), data)
    data.update(fixed)
    return model.model_validate(data)


def _field_annotation(model: type[BaseModel], parts: list[str]) -> Any:
    annotation: Any = model
    for part in parts:
        annotation = annotation.model_fields[part].annotation
    return annotation


def add_tracking_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI; stage commands "
                   "track only when one is set)")
    p.add_argument("--experiment", default="caopd", help="MLflow experiment (default: caopd)")
    p.add_argument("--pipeline-run-id", help="groups the stage runs under one parent run (default: a new id)")
    p.add_argument("--artifact-root", help="where a new experiment keeps artifacts, e.g. s3://bucket/caopd")
    p.add_argument("--mlflow-dir", default="mlflow", help="local MLflow store (SQLite) when no tracking URI is set; "
                   "registry commands use it (default: ./mlflow)")


def add_registry_options(p: argparse.ArgumentParser) -> None:
    """The registry commands' options: which registry; they log no run, so no experiment or pipeline run."""
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store)")
    p.add_argument("--mlflow-dir", default="mlflow", help="local MLflow store (SQLite) when no tracking URI is set "
                   "(default: ./mlflow)")


def add_kfp_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="the KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="a pipeline parameter (repeatable); typed and checked against the compiled spec")
    p.add_argument("--experiment", default="caopd", help="KFP experiment (created if missing; default: caopd)")
    p.add_argument("--pipeline-name", help="pipeline name in KFP (default: caopd)")
    p.add_argument("--pipeline-file", help="compiled spec to upload (default: the packaged caopd_pipeline.yaml)")
    p.add_argument("--namespace", help="profile namespace on a multi-user Kubeflow")
    p.add_argument("--token-file", help="file holding the bearer token (default: $KFP_TOKEN, else the "
                   "service-account token KFP mounts in pods); never pass the token itself")

