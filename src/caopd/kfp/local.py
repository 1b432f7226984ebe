"""The main job: the Kubeflow pipeline itself, run on this machine through ``kfp.local``.

Base, plain OPD and CaOPD from one base model, evaluated on the same held-out prompts — the same DAG and
components a cluster runs, with every task a subprocess of the host Python and the pipeline root under
``OUT/kfp``. Afterwards the evaluation and each arm's training output are copied to stable places under ``OUT``.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from caopd.config.parameters import run_arguments
from caopd.config.presets import check_pipeline_values
from caopd.config.run import ARMS, RunConfig
from caopd.config.stages import SUMMARY
from caopd.errors import CaopdServiceError
from caopd.evaluation.metrics import METRIC_KEYS
from caopd.evaluation.tables import comparison_table, print_comparison
from caopd.experiments.continual import FORGETTING, forgetting_table
from caopd.io import atomic_dir, read_json, write_json, write_text


def pipeline_arguments(cfg: RunConfig, mlflow_dir: Path) -> dict[str, Any]:
    """The pipeline's parameters for this config, read through the one mapping (caopd.config.parameters); the
    rest keep the pipeline's own defaults."""
    return {
        **run_arguments(cfg),
        # Every stage logs to one local MLflow store (SQLite), and the registry lives there too.
        "mlflow_settings": {"tracking_uri": f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                            "artifact_root": str(mlflow_dir / "artifacts"), "experiment": "caopd"},
    }


def pipeline_defaults() -> dict[str, Any]:
    """The pipeline's parameters at their defaults (its signature)."""
    import inspect

    from caopd.pipelines import caopd_pipeline

    return {name: p.default for name, p in inspect.signature(caopd_pipeline.pipeline_func).parameters.items()}


def task_environment(progress: bool, cpus: int | None = None) -> dict[str, str]:
    """Environment for the task subprocesses (they inherit ours).

    kfp.local runs up to two ParallelFor iterations at once (the two training arms); torch in each would
    otherwise start one thread per core and the two would thrash, so each gets half the cores unless the
    user set OMP_NUM_THREADS. tqdm reads TQDM_DISABLE.
    """
    env = {}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (cpus or os.cpu_count() or 2) // 2))
    if not progress:
        env["TQDM_DISABLE"] = "1"
    return env


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_pipeline_locally(arguments: dict[str, Any], pipeline_root: Path, cache: bool = False,
                         progress: bool = True) -> Any:
    """Run the compiled-for-cluster pipeline with kfp.local; returns its outputs (artifacts with local paths).

    With progress on, the tasks' logs stream to the terminal; otherwise they go to ``pipeline_root/pipeline.log``.
    """
    from kfp import local

    from caopd.pipelines import caopd_pipeline

    pipeline_root.mkdir(parents=True, exist_ok=True)
    log_path = pipeline_root / "pipeline.log"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               workspace_root=str(pipeline_root / "workspace"), enable_caching=cache)
    with contextlib.ExitStack() as stack:
        # kfp.local indents task logs by swapping builtins.print per task; two ParallelFor iterations in threads
        # can restore each other's swap, leaving every later print in this process indented. Put it back.
        stack.callback(setattr, builtins, "print", builtins.print)
        stack.enter_context(warnings.catch_warnings())
        # The components name the project's images; kfp.local's SubprocessRunner ignores them and runs every
        # task with the host Python.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*", category=UserWarning)
        stack.enter_context(_environment(task_environment(progress)))
        if not progress:  # kfp.local logs and streams task output to sys.stdout
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(log_path.open("w"))))
        try:
            return caopd_pipeline(**arguments).outputs
        except RuntimeError as err:
            where = "above" if progress else f"in {log_path}"
            plain = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # kfp.local colours its messages
            raise CaopdServiceError(f"the local pipeline run failed: {plain} (the failing task's log is {where})") \
                from None


def _copy_dir(source: str | Path, target: Path) -> None:
    with atomic_dir(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def collect_forgetting(run_dir: Path) -> dict[str, dict[str, float]]:
    """Each arm's forgetting, from the continual-evaluation tasks of one local pipeline run (the branch runs
    inside the arms' ParallelFor, so no pipeline output carries them)."""
    found: dict[str, dict[str, float]] = {}
    for path in sorted(run_dir.glob(f"**/continual-evaluation/evaluation/{FORGETTING}")):
        found.update(read_json(path)["forgetting"])
    return {method: found[method] for method in ("opd", "caopd", *sorted(found)) if method in found}


def run_main_job(cfg: RunConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    out = Path(out_dir).resolve()
    arguments = pipeline_arguments(cfg, out / "mlflow")
    # Every stage's config, as the components will build it (the preset applied): a bad combination fails now.
    check_pipeline_values({**pipeline_defaults(), **arguments})
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    (out / "mlflow").mkdir(exist_ok=True)
    outputs = run_pipeline_locally(arguments, out / "kfp", cfg.cache, progress)
    _copy_dir(outputs["evaluation"].path, out / "evaluation")
    evaluation = read_json(out / "evaluation" / SUMMARY)
    for arm in ("opd", "caopd"):
        if arm in evaluation["arms"]:  # its model folder sits in the training output, beside the curves and log
            _copy_dir(Path(evaluation["arms"][arm]["model"]).parent, out / f"train_{arm}")
    registered = outputs["registered"].metadata
    arms = [arm for arm in ARMS if arm in evaluation["arms"]]
    summary = {"arms": {arm: {k: evaluation["arms"][arm][k] for k in METRIC_KEYS} for arm in arms},
               "config": cfg.model_dump(), "seconds": round(time.perf_counter() - start, 1),
               "registered": {"name": registered["name"], "version": int(registered["version"]),
                              "source": registered["source"], "gates_passed": registered["gates_passed"],
                              "tracking_uri": registered["tracking_uri"]},
               "plots": {arm: f"evaluation/reliability_{arm}.png" for arm in arms},
               "pipeline_root": str(out / "kfp")}
    comparison = comparison_table(summary["arms"]) + "\n"
    for set_name, scored in evaluation.get("sets", {}).items():  # the OOD set when kinds were held out
        summary[set_name] = {arm: {k: scored["arms"][arm][k] for k in METRIC_KEYS} for arm in arms}
        comparison += f"\n{set_name}:\n\n" + comparison_table(summary[set_name]) + "\n"
    forgetting = collect_forgetting(Path(outputs["evaluation"].path).parents[1])
    if forgetting:  # the run trained each arm on task B too
        summary["continual"] = forgetting
        comparison += "\ncalibration forgetting (task A before and after task B):\n\n" + forgetting_table(forgetting)
    write_json(out / SUMMARY, summary)
    write_text(out / "comparison.md", comparison)
    if progress:
        print_comparison(summary["arms"])
    return summary
