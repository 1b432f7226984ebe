"""Stage 4 — calibration evaluation: every arm answers the same held-out prompts; metrics, plots, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from caopd.models.loading import load_model
from caopd.rollout import make_engine
from caopd.stages.common import context_length, fit_to_context, score_completions
from caopd.tasks import get_task
from caopd.tasks.datasets import load_examples


def _suffix(set_name: str | None) -> str:
    return "" if set_name is None else f"_{set_name}"


def evaluate_on(loaded, name: str, set_name: str | None, cfg: EvaluateConfig, examples, source: str, out: Path,
                progress: bool) -> dict[str, Any]:
    """One arm on one prompt set: predictions, plots and metrics (files end in ``_<set>`` for an extra set)."""
    kept, skipped = fit_to_context(examples, loaded.tokenizer, context_length(loaded.model),
                                   cfg.sampling.max_new_tokens, source=source)
    outputs = make_engine(loaded, cfg.engine).generate(
        [render_prompt(loaded.tokenizer, e.prompt) for e in kept], cfg.sampling, progress)
    rows = score_completions(get_task(cfg.task_of(set_name)), kept, outputs)
    kinds = {e.id: e.meta.get("kind", "") for e in kept}
    for row in rows:
        row["kind"] = kinds[row["prompt_id"]]
    tag = f"{name}{_suffix(set_name)}"
    write_jsonl(out / f"predictions_{tag}.jsonl", rows)
    confidences, correct = [r["confidence"] for r in rows], [r["correct"] for r in rows]
    plot_reliability_diagram(confidences, correct, out / f"reliability_{tag}.png", title=f"{tag}: reliability")
    plot_confidence_histogram(confidences, correct, out / f"confidence_{tag}.png", title=f"{tag}: confidence")
    result = {**calibration_metrics(confidences, correct), "aurc": aurc(confidences, correct)}
    if any(row["kind"] for row in rows):  # a task's kinds (arithmetic: add_1x1 ... mul_2x2)
        result["by_kind"] = metrics_by_group(confidences, correct, [row["kind"] or "(none)" for row in rows])
    if cfg.bootstrap_resamples:
        result["intervals"] = bootstrap_intervals(confidences, correct, cfg.bootstrap_resamples, seed=cfg.sampling.seed)
    return {**result, "skipped_too_long": len(skipped)}


def _report_section(title: str, arms: dict[str, Any], with_intervals: bool) -> str:
    section = f"## {title}\n\n" + comparison_table(arms) + "\n"
    if with_intervals:
        section += "95 % bootstrap intervals:\n\n" + intervals_table(arms) + "\n"
    if by_kind := by_kind_table(arms):
        section += "Accuracy / mean stated confidence by kind:\n\n" + by_kind + "\n"
    return section


def run_evaluation(cfg: EvaluateConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    prompt_sets = {None: (cfg.data, load_examples(cfg.data, get_task(cfg.task))),
                   **{name: (path, load_examples(path, get_task(cfg.task_of(name))))
                      for name, path in cfg.extra_data.items()}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str | None, dict[str, Any]] = {set_name: {} for set_name in prompt_sets}
    for name, model in cfg.models.items():
        loaded = load_model(model, progress=progress)
        for set_name, (source, examples) in prompt_sets.items():
            results[set_name][name] = {**evaluate_on(loaded, name, set_name, cfg, examples, source, out, progress),
                                       "model": model}
    report = "# Calibration evaluation\n\n"
    for set_name, arms in results.items():
        suffix = _suffix(set_name)
        plot_risk_coverage({name: load_predictions(out / f"predictions_{name}{suffix}.jsonl") for name in arms},
                           out / f"risk_coverage{suffix}.png", title=f"risk–coverage{suffix.replace('_', ': ')}")
        report += _report_section("in-domain" if set_name is None else set_name, arms, bool(cfg.bootstrap_resamples))
    if cfg.extra_data:
        report += side_by_side(results)
    write_text(out / REPORT, report)
    summary = {"stage": CALIBRATION_EVALUATION.id, "config": cfg.model_dump(), "data_digest": file_digest(cfg.data),
               "arms": results[None],
               "sets": {name: {"arms": results[name], "data_digest": file_digest(path), "task": cfg.task_of(name)}
                        for name, path in cfg.extra_data.items()}}
    write_json(out / SUMMARY, summary)
    return summary


def side_by_side(results: dict[str | None, dict[str, Any]]) -> str:
    """Each arm's key metrics on every set, in one table: how far its calibration carries off its training
    distribution."""
    keys = ("accuracy", "ece", "auroc", "overconfidence_gap")
    names = ["in-domain" if s is None else s for s in results]
    rows = [[arm, *(f"{results[s][arm][k]:.3f}" for k in keys for s in results)] for arm in results[None]]
    return "## Side by side\n\n" + markdown_table(["arm", *(f"{k} ({n})" for k in keys for n in names)], rows)
