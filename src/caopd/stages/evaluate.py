"""Stage 4 — calibration evaluation: every arm answers the same held-out prompts; metrics, plots, report.

``evaluate_arm`` and ``write_report`` turn scored completions into predictions, metrics, plots and the report; this
stage feeds them the completions its models generate, ``caopd score`` (``caopd.stages.score``) the completions a
user logged. Model code loads only inside ``run_evaluation``, so scoring needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caopd.config.engines import RunLengths
from caopd.config.stages import CALIBRATION_EVALUATION, REPORT, SUMMARY, EvaluateConfig
from caopd.evaluation.metrics import (
    aurc,
    bootstrap_intervals,
    calibration_metrics,
    load_predictions,
    metrics_by_group,
)
from caopd.evaluation.plots import plot_confidence_histogram, plot_reliability_diagram, plot_risk_coverage
from caopd.evaluation.tables import by_kind_table, comparison_table, intervals_table, markdown_table
from caopd.io import file_digest, write_json, write_jsonl, write_text
from caopd.method.templates import render_prompt
from caopd.rollout import make_engine, wants_vllm
from caopd.rollout.base import RolloutEngine
from caopd.stages.common import check_names, context_length, fit_to_context, score_completions
from caopd.stages.sources import Found, dataset_path, model_path
from caopd.tasks import get_task
from caopd.tasks.base import Example, Task
from caopd.tasks.datasets import load_examples

# Arm results keyed by prompt set (None = the in-domain set), then by arm name.
Results = Mapping[str | None, Mapping[str, Mapping[str, Any]]]


def _suffix(set_name: str | None) -> str:
    return "" if set_name is None else f"_{set_name}"


def check_accuracies(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``accuracy_<check>``: the share of rows that pass each of the task's extra checks (tool use: all calls)."""
    return {f"accuracy_{name}": sum(bool(row.get(name, False)) for row in rows) / len(rows)
            for name in check_names(rows)}


def evaluate_arm(rows: list[dict[str, Any]], examples: Sequence[Example], tag: str, out: Path,
                 bootstrap_resamples: int, seed: int) -> dict[str, Any]:
    """One arm's scored completions on one prompt set (rows from ``caopd.stages.common.prediction_row``): writes
    ``predictions_<tag>.jsonl``, ``reliability_<tag>.png`` and ``confidence_<tag>.png``, returns the metrics, the
    extra checks' accuracies beside ``accuracy``, per-kind metrics when the task has kinds, and bootstrap
    intervals unless ``bootstrap_resamples`` is 0."""
    kinds = {e.id: e.meta.get("kind", "") for e in examples}
    for row in rows:
        row["kind"] = kinds[row["prompt_id"]]
    write_jsonl(out / f"predictions_{tag}.jsonl", rows)
    confidences, correct = [r["confidence"] for r in rows], [r["correct"] for r in rows]
    plot_reliability_diagram(confidences, correct, out / f"reliability_{tag}.png", title=f"{tag}: reliability")
    plot_confidence_histogram(confidences, correct, out / f"confidence_{tag}.png", title=f"{tag}: confidence")
    metrics = calibration_metrics(confidences, correct)
    # the extra accuracies right after accuracy, where a reader of the summary compares them
    result: dict[str, Any] = {"accuracy": metrics["accuracy"], **check_accuracies(rows), **metrics,
                              "aurc": aurc(confidences, correct)}
    if any(row["kind"] for row in rows):  # a task's kinds (arithmetic: add_1x1 ... mul_2x2)
        result["by_kind"] = metrics_by_group(confidences, correct, [row["kind"] or "(none)" for row in rows])
    if bootstrap_resamples:
        result["intervals"] = bootstrap_intervals(confidences, correct, bootstrap_resamples, seed=seed)
    return result


@dataclass
class FittedSet:
    """One prompt set as one model sees it: the examples that fit its context with room for ``max_new_tokens``,
    the ids of those skipped, and the kept prompts rendered."""

    kept: list[Example]
    skipped: list[str]
    prompts: list[str]


def fit_set(tokenizer: Any, context: int, examples: Sequence[Example], cfg: EvaluateConfig, source: str) -> FittedSet:
    kept, skipped = fit_to_context(examples, tokenizer, context, cfg.sampling.max_new_tokens, source=source,
                                   thinking=cfg.prompt.thinking)
    return FittedSet(kept, skipped, [render_prompt(tokenizer, e.prompt, cfg.prompt.thinking) for e in kept])


def evaluate_on(engine: RolloutEngine, name: str, set_name: str | None, cfg: EvaluateConfig, task: Task,
                fitted: FittedSet, out: Path, progress: bool) -> dict[str, Any]:
    """One model (its ``engine``) on one prompt set: generate, score, ``evaluate_arm`` (files end in ``_<set>`` for
    an extra set)."""
    outputs = engine.generate(fitted.prompts, cfg.sampling, progress)
    result = evaluate_arm(score_completions(task, fitted.kept, outputs), fitted.kept, f"{name}{_suffix(set_name)}",
                          out, cfg.bootstrap_resamples, cfg.sampling.seed)
    return {**result, "skipped_too_long": len(fitted.skipped)}


def evaluate_model(source: str, name: str, cfg: EvaluateConfig, tasks: Mapping[str | None, Task],
                   prompt_sets: Mapping[str | None, Sequence[Example]], sources: Mapping[str | None, str], out: Path,
                   progress: bool) -> tuple[dict[str | None, dict[str, Any]], dict[str, Any] | None]:
    """One arm on every prompt set, with one engine, released before the next arm's: each set's results, and the
    vLLM engine's sizing (None with transformers). With vLLM only the model's tokenizer and config are read (vLLM
    loads the weights), and the engine is sized for the arm's longest prompt over its sets."""
    from caopd.models.loading import config_context_length, encode_text, load_model, load_tokenizer_and_config

    vllm = wants_vllm(cfg.engine)
    loaded = load_tokenizer_and_config(source) if vllm else load_model(source, progress=progress)
    context = config_context_length(loaded.config) if vllm else context_length(loaded.model)
    fitted = {set_name: fit_set(loaded.tokenizer, context, examples, cfg, sources[set_name])
              for set_name, examples in prompt_sets.items()}
    run = None
    if vllm:
        run = RunLengths(max(len(encode_text(loaded.tokenizer, p)) for f in fitted.values() for p in f.prompts),
                         cfg.sampling.max_new_tokens, max(len(f.prompts) for f in fitted.values()) * cfg.sampling.n)
    engine = make_engine(loaded, cfg.engine, cfg.vllm, run)
    try:
        results = {set_name: evaluate_on(engine, name, set_name, cfg, tasks[set_name], f, out, progress)
                   for set_name, f in fitted.items()}
    finally:
        engine.shutdown()
    return results, engine.sizing.summary() if vllm else None


def _extra_accuracies_table(arms: Mapping[str, Mapping[str, Any]]) -> str:
    """Each arm's ``accuracy`` beside the task's other accuracies (``accuracy_<check>``); empty when it has none."""
    extra = sorted({key for metrics in arms.values() for key in metrics if key.startswith("accuracy_")})
    if not extra:
        return ""
    keys = ["accuracy", *extra]
    return markdown_table(["arm", *keys], [[name, *(f"{metrics[k]:.3f}" if k in metrics else "n/a" for k in keys)]
                                           for name, metrics in arms.items()])


def _report_section(title: str, arms: Mapping[str, Mapping[str, Any]], with_intervals: bool) -> str:
    section = f"## {title}\n\n" + comparison_table(arms) + "\n"
    if extra := _extra_accuracies_table(arms):
        section += "The task's other accuracies:\n\n" + extra + "\n"
    if with_intervals:
        section += "95 % bootstrap intervals:\n\n" + intervals_table(arms) + "\n"
    if by_kind := by_kind_table(arms):
        section += "Accuracy / mean stated confidence by kind:\n\n" + by_kind + "\n"
    return section


def write_report(results: Results, out: Path, heading: str, with_intervals: bool, main_set: str = "in-domain") -> str:
    """The risk–coverage plot of each prompt set (from its arms' predictions files) and ``report.md``: one section
    per set (``main_set`` titles the set keyed None), and a side-by-side table when there are several. Returns the
    report's text."""
    report = f"# {heading}\n\n"
    for set_name, arms in results.items():
        suffix = _suffix(set_name)
        plot_risk_coverage({name: load_predictions(out / f"predictions_{name}{suffix}.jsonl") for name in arms},
                           out / f"risk_coverage{suffix}.png", title=f"risk–coverage{suffix.replace('_', ': ')}")
        report += _report_section(main_set if set_name is None else set_name, arms, with_intervals)
    if len(results) > 1:
        report += side_by_side(results)
    write_text(out / REPORT, report)
    return report


def run_evaluation(cfg: EvaluateConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    found: Found = {}
    sources = {None: dataset_path(cfg.data, "eval_data", found),
               **{name: dataset_path(path, f"eval_data_{name}", found) for name, path in cfg.extra_data.items()}}
    tasks = {set_name: get_task(cfg.task_of(set_name), **cfg.prompt.task_options()) for set_name in sources}
    prompt_sets = {set_name: load_examples(path, tasks[set_name]) for set_name, path in sources.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str | None, dict[str, Any]] = {set_name: {} for set_name in sources}
    sizings: dict[str, Any] = {}
    for name, model in cfg.models.items():  # one arm's engine at a time, shut down before the next arm's starts
        arm, sizing = evaluate_model(model_path(model, f"model_{name}", found), name, cfg, tasks, prompt_sets,
                                     sources, out, progress)
        for set_name, result in arm.items():
            results[set_name][name] = {**result, "model": model}
        if sizing is not None:
            sizings[name] = sizing
    write_report(results, out, "Calibration evaluation", bool(cfg.bootstrap_resamples))
    summary = {"stage": CALIBRATION_EVALUATION.id, "config": cfg.model_dump(), "sources": found,
               "confidence_instruction": tasks[None].confidence_instruction_text,
               "data_digest": file_digest(sources[None]), "arms": results[None],
               "sets": {name: {"arms": results[name], "data_digest": file_digest(sources[name]),
                               "task": cfg.task_of(name),
                               "confidence_instruction": tasks[name].confidence_instruction_text}
                        for name in cfg.extra_data}, **({"vllm": sizings} if sizings else {})}
    write_json(out / SUMMARY, summary)
    return summary


def side_by_side(results: Results) -> str:
    """Each arm's key metrics on every set, in one table: how far its calibration carries off its training
    distribution."""
    keys = ("accuracy", "ece", "auroc", "overconfidence_gap")
    names = ["in-domain" if s is None else s for s in results]
    rows = [[arm, *(f"{results[s][arm][k]:.3f}" for k in keys for s in results)] for arm in results[None]]
    return "## Side by side\n\n" + markdown_table(["arm", *(f"{k} ({n})" for k in keys for n in names)], rows)
