"""Cascade routing on stated confidence: keep the small model's answer when its confidence reaches a threshold,
otherwise call the large model.

The small model always runs (its answer carries the confidence); a prompt it escalates also pays for the large
model. A missing confidence counts as 0.0, as in the metrics, so it is always escalated. The sweep covers every
threshold that changes a decision: each distinct confidence (escalate what lies below it) and +inf (escalate
everything).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caopd.config.experiments import RouteConfig
from caopd.errors import CaopdInputError
from caopd.evaluation.metrics import (
    parse_prediction,
    read_prediction_records,
    validate_predictions,
)
from caopd.evaluation.tables import markdown_table
from caopd.method.protocol import parse_confidence


@dataclass(frozen=True)
class RoutingCurve:
    """One point per threshold, thresholds ascending: escalate when confidence < threshold."""

    thresholds: np.ndarray
    accuracy: np.ndarray   # expected accuracy of the cascade
    cost: np.ndarray       # mean cost per prompt: the small model always, the large one when escalated
    escalated: np.ndarray  # share of prompts sent to the large model


def routing_curve(confidences: Sequence[float | None] | np.ndarray, small_correct: Sequence[bool] | np.ndarray,
                  large_correct: Sequence[bool] | np.ndarray | None = None, *, large_accuracy: float | None = None,
                  small_cost: float = 1.0, large_cost: float = 10.0) -> RoutingCurve:
    """The accuracy and cost of the cascade at every threshold.

    The large model is given either per prompt (``large_correct``, aligned with the small model's predictions) or
    by a stated accuracy, which an escalated prompt then contributes in expectation.
    """
    conf, _, small = validate_predictions(confidences, small_correct)
    if (large_correct is None) == (large_accuracy is None):
        raise ValueError("give the large model's per-prompt correctness or its stated accuracy, not both")
    if large_correct is not None:
        large = np.asarray(large_correct, dtype=bool).astype(np.float64)
        if large.shape != small.shape:
            raise ValueError(f"{small.size} small-model predictions but {large.size} large-model ones")
    else:
        if not 0.0 <= large_accuracy <= 1.0:
            raise ValueError(f"large_accuracy must lie in [0, 1], got {large_accuracy}")
        large = np.full(small.shape, float(large_accuracy))
    if small_cost < 0 or large_cost <= 0:
        raise ValueError("costs must be non-negative, and the large model's positive")
    order = np.argsort(conf, kind="stable")
    thresholds = np.append(np.unique(conf), math.inf)
    n_escalated = np.searchsorted(conf[order], thresholds, side="left")
    gain = np.concatenate([[0.0], np.cumsum(large[order] - small[order])])  # swapping the lowest-confidence first
    escalated = n_escalated / conf.size
    return RoutingCurve(thresholds, (small.sum() + gain[n_escalated]) / conf.size,
                        small_cost + large_cost * escalated, escalated)


def cheapest_point(curve: RoutingCurve, target_accuracy: float) -> int | None:
    """Index of the cheapest threshold whose accuracy reaches the target (the more accurate on a cost tie), or
    None when no threshold does."""
    reaches = np.flatnonzero(curve.accuracy >= target_accuracy - 1e-12)
    if reaches.size == 0:
        return None
    return int(min(reaches, key=lambda i: (curve.cost[i], -curve.accuracy[i])))


def routing_summary(curve: RoutingCurve, target_accuracy: float, large_cost: float) -> dict:
    """The chosen threshold for a target accuracy and its saving against calling the large model on every prompt."""
    best = cheapest_point(curve, target_accuracy)
    if best is None:
        return {"target_accuracy": target_accuracy, "reachable": False,
                "best_accuracy": float(curve.accuracy.max())}
    threshold = float(curve.thresholds[best])
    return {"target_accuracy": target_accuracy, "reachable": True,
            "threshold": None if math.isinf(threshold) else threshold,  # None: escalate every prompt
            "accuracy": float(curve.accuracy[best]), "cost_per_prompt": float(curve.cost[best]),
            "escalated": float(curve.escalated[best]), "saving_vs_large": 1.0 - float(curve.cost[best]) / large_cost}


@dataclass(frozen=True)
class ConfidenceRouter:
    """The inference-time rule for a chosen threshold: escalate a completion whose stated confidence is below it
    or missing."""

    threshold: float

    def escalate(self, confidence: float | None) -> bool:
        return confidence is None or math.isnan(confidence) or confidence < self.threshold

    def escalate_completion(self, text: str) -> bool:
        return self.escalate(parse_confidence(text))


def load_keyed_predictions(path: str | Path) -> dict[str, tuple[float, bool]]:
    """A predictions JSONL (the evaluation stage's ``predictions_<arm>.jsonl``) keyed by ``prompt_id``; errors name
    the file, row and field."""
    keyed: dict[str, tuple[float, bool]] = {}
    for row, record in enumerate(read_prediction_records(path)):
        if "prompt_id" not in record:
            raise CaopdInputError("missing (routing joins the two models on it)", file=str(path), row=row,
                                  field="prompt_id")
        key = str(record["prompt_id"])
        if key in keyed:
            raise CaopdInputError(f"duplicate prompt_id {key!r}", file=str(path), row=row, field="prompt_id")
        keyed[key] = parse_prediction(record, str(path), row)
    return keyed


def aligned(small: dict[str, tuple[float, bool]], large: dict[str, tuple[float, bool]], small_path: str,
            large_path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(small confidence, small correct, large correct) over the prompts both files hold; every small-model prompt
    must have a large-model prediction."""
    missing = [key for key in small if key not in large]
    if missing:
        raise CaopdInputError(f"{len(missing)} prompts have no large-model prediction (first: {missing[0]!r}); "
                              f"both files must cover the same prompts (small: {small_path})", file=large_path,
                              field="prompt_id")
    keys = list(small)
    return (np.array([small[k][0] for k in keys]), np.array([small[k][1] for k in keys]),
            np.array([large[k][1] for k in keys]))


def run_routing(cfg: RouteConfig, out_dir: str | Path) -> dict:
    """Sweep every small model's threshold; write routing.json, routing.md and routing.png to ``out_dir``."""
    from caopd.evaluation.plots import plot_routing
    from caopd.io import write_json, write_text

    large = load_keyed_predictions(cfg.large) if cfg.large else None
    curves, chosen = {}, {}
    large_accuracy = cfg.large_accuracy
    for name, path in cfg.small.items():
        small = load_keyed_predictions(path)
        if large is None:
            conf = np.array([c for c, _ in small.values()])
            correct = np.array([y for _, y in small.values()])
            curve = routing_curve(conf, correct, large_accuracy=cfg.large_accuracy, small_cost=cfg.small_cost,
                                  large_cost=cfg.large_cost)
        else:
            conf, correct, large_correct = aligned(small, large, path, cfg.large)
            large_accuracy = float(large_correct.mean())
            curve = routing_curve(conf, correct, large_correct, small_cost=cfg.small_cost,
                                  large_cost=cfg.large_cost)
        curves[name] = curve
        chosen[name] = {**routing_summary(curve, cfg.target_accuracy, cfg.large_cost),
                        "small_alone_accuracy": float(curve.accuracy[0]), "n": int(conf.size)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_routing(curves, chosen, cfg.target_accuracy, cfg.large_cost, large_accuracy, out / "routing.png",
                 title=f"cascade routing on stated confidence (large model {cfg.large_cost:g}× the cost)")
    curve_points = {name: {"threshold": [None if math.isinf(t) else float(t) for t in c.thresholds],
                           "accuracy": c.accuracy.tolist(), "cost": c.cost.tolist(), "escalated": c.escalated.tolist()}
                    for name, c in curves.items()}
    summary = {"config": cfg.model_dump(), "large_accuracy": large_accuracy, "small": chosen, "curves": curve_points}
    write_json(out / "routing.json", summary)
    write_text(out / "routing.md", routing_table(chosen, cfg.target_accuracy, cfg.large_cost))
    return summary


def routing_table(chosen: dict, target_accuracy: float, large_cost: float) -> str:
    rows = []
    for name, point in chosen.items():
        if point["reachable"]:
            threshold = "all" if point["threshold"] is None else f"{point['threshold']:.3f}"
            rows.append([name, f"{point['small_alone_accuracy']:.3f}", threshold, f"{point['accuracy']:.3f}",
                         f"{point['cost_per_prompt']:.2f}", f"{point['escalated']:.1%}",
                         f"{point['saving_vs_large']:.1%}"])
        else:
            rows.append([name, f"{point['small_alone_accuracy']:.3f}",
                         f"not reachable (best {point['best_accuracy']:.3f})", "", "", "", ""])
    header = ["small model", "alone: accuracy", "threshold", "accuracy", "cost per prompt", "escalated", "saving"]
    return (f"Target accuracy {target_accuracy:.3f}; the large model on every prompt costs {large_cost:g} per prompt."
            "\n\n" + markdown_table(header, rows))
