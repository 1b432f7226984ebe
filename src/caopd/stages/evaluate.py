"""Stage 4 — calibration evaluation: every arm answers the same held-out prompts; metrics, plots, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from caopd.data import file_digest, load_examples, write_json, write_jsonl, write_text
from caopd.metrics import aurc, bootstrap_intervals, calibration_metrics, load_predictions
from caopd.models.loading import load_model
from caopd.report import (comparison_table, intervals_table, plot_confidence_histogram, plot_reliability_diagram,
                          plot_risk_coverage)
from caopd.rollout import EngineName, SamplingConfig, make_engine
from caopd.stages.common import context_length, fit_to_context, score_completions
from caopd.tasks import get_task
from caopd.templates import render_prompt

SUMMARY, REPORT = "summary.json", "report.md"


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, str] = Field(..., description="arm name -> model ('tiny', a folder or a hub id)")
    task: str = Field("arithmetic", description="task name")
    data: str = Field(..., description="held-out prompts: a load_from_disk folder, .jsonl or .parquet")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(n=1, temperature=1.0, max_new_tokens=24, seed=1234),
        description="decoding at test time; the default samples as rollout estimation does, so that the "
                    "confidence a model learned (its sampled success rate) is scored against the same policy")
    engine: EngineName = Field("auto", description="auto: vLLM on a GPU when installed, else transformers")
    bootstrap_resamples: int = Field(1000, ge=0, description="resamples for the 95 % bootstrap interval of every "
                                                             "metric (0: no intervals)")

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one model to evaluate")
        bad = [name for name in value if not name.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"arm names must be letters, digits, '-' or '_': {bad}")
        return value


def evaluate_arm(name: str, model: str, cfg: EvaluateConfig, examples, out: Path, progress: bool) -> dict[str, Any]:
    loaded = load_model(model, progress=progress)
    kept, skipped = fit_to_context(examples, loaded.tokenizer, context_length(loaded.model),
                                   cfg.sampling.max_new_tokens, source=cfg.data)
    outputs = make_engine(loaded, cfg.engine).generate(
        [render_prompt(loaded.tokenizer, e.prompt) for e in kept], cfg.sampling, progress)
    rows = score_completions(get_task(cfg.task), kept, outputs)
    kinds = {e.id: e.meta.get("kind", "") for e in kept}
    for row in rows:
        row["kind"] = kinds[row["prompt_id"]]
    write_jsonl(out / f"predictions_{name}.jsonl", rows)
    confidences, correct = [r["confidence"] for r in rows], [r["correct"] for r in rows]
    plot_reliability_diagram(confidences, correct, out / f"reliability_{name}.png", title=f"{name}: reliability")
    plot_confidence_histogram(confidences, correct, out / f"confidence_{name}.png", title=f"{name}: confidence")
    result = {**calibration_metrics(confidences, correct), "aurc": aurc(confidences, correct)}
    if cfg.bootstrap_resamples:
        result["intervals"] = bootstrap_intervals(confidences, correct, cfg.bootstrap_resamples, seed=cfg.sampling.seed)
    return {**result, "skipped_too_long": len(skipped), "model": model}


def run_evaluation(cfg: EvaluateConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    examples = load_examples(cfg.data, get_task(cfg.task))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arms = {name: evaluate_arm(name, model, cfg, examples, out, progress) for name, model in cfg.models.items()}
    plot_risk_coverage({name: load_predictions(out / f"predictions_{name}.jsonl") for name in arms},
                       out / "risk_coverage.png", title="risk–coverage")
    report = "# Calibration evaluation\n\n" + comparison_table(arms) + "\n"
    if cfg.bootstrap_resamples:
        report += "\n95 % bootstrap intervals:\n\n" + intervals_table(arms) + "\n"
    write_text(out / REPORT, report)
    summary = {"stage": "calibration-evaluation", "config": cfg.model_dump(), "data_digest": file_digest(cfg.data),
               "arms": arms}
    write_json(out / SUMMARY, summary)
    return summary
