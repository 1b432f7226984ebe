"""The KFP pipeline and its committed compiled spec; installed as ``caopd.pipelines``."""

import ast
import json
import re
import tempfile
from pathlib import Path

from caopd.pipelines.caopd_pipeline import PIPELINE_NAME, build_pipeline, caopd_pipeline

COMPILED_PIPELINE = Path(__file__).with_name("caopd_pipeline.yaml")
_HEADER_DEFAULT = re.compile(r"^(#\s+\w+: \w+ \[Default: )([\[{].*)\]$")


def stable_header(spec_text: str) -> str:
    """kfp's header comment prints dict and list defaults in protobuf-map order, which changes from process to
    process; print them with sorted keys so that one pipeline always compiles to the same bytes."""
    lines = spec_text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        match = _HEADER_DEFAULT.match(line)
        if match:
            lines[i] = match.group(1) + json.dumps(ast.literal_eval(match.group(2)), sort_keys=True) + "]"
    return "\n".join(lines)


def compile_pipeline(path: str | Path = COMPILED_PIPELINE, workspace_pvc: str = "",
                     secret_env: dict[str, str] | None = None) -> Path:
    """Write the compiled pipeline spec (the YAML a KFP server or the Kubeflow UI takes); ``workspace_pvc``
    mounts that PVC on the training step (checkpoints that outlive the pod; multi-node jobs); ``secret_env``
    (NAME → 'secret/key'; default: the pipeline identity's MLflow credentials) reaches every task that tracks."""
    from kfp import compiler

    from caopd.io import write_text

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "pipeline.yaml"
        pipeline = build_pipeline(workspace_pvc, secret_env) if workspace_pvc or secret_env is not None \
            else caopd_pipeline
        compiler.Compiler().compile(pipeline, package_path=str(raw))
        write_text(path, stable_header(raw.read_text(encoding="utf-8")))
    return Path(path)


__all__ = ["COMPILED_PIPELINE", "PIPELINE_NAME", "build_pipeline", "caopd_pipeline", "compile_pipeline",
           "stable_header"]
