"""Plots: reliability diagram, confidence histogram, risk–coverage, training curves, routing and comparison.

Plots use matplotlib's object API with the Agg canvas, never pyplot: no display is needed, and no global
backend or figure state leaks into the caller's process. Every PNG is written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from caopd.evaluation.metrics import (
    aurc,
    bin_indices,
    ece_from_bins,
    reliability_bins,
    risk_coverage,
    validate_predictions,
)
from caopd.io import atomic_file

_CORRECT_COLOR, _INCORRECT_COLOR, _GAP_COLOR = "#4c72b0", "#dd8452", "#c44e52"


def _save_png_atomic(fig: Figure, path: str | Path) -> Path:
    """Save the figure through a temporary file, so a reader never sees a half-written PNG."""
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png", dpi=120)
    return Path(path)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_reliability_diagram(confidences: Sequence[float | None] | np.ndarray,
                             correct: Sequence[bool] | np.ndarray, path: str | Path, title: str,
                             n_bins: int = 10) -> Path:
    """Accuracy per confidence bin against the diagonal, with bin counts in a panel underneath.

    Missing confidences count as 0.0 (as in the metrics), so they sit in the first bin; the title states
    their share along with the ECE.
    """
    _, missing, _ = validate_predictions(confidences, correct)
    bins = reliability_bins(confidences, correct, n_bins)
    filled = bins.counts > 0
    left, width = bins.edges[:-1], 1.0 / n_bins

    fig = _new_figure(6.0, 6.5)
    ax, ax_counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    ax.bar(left[filled], bins.accuracy[filled], width=width, align="edge", color=_CORRECT_COLOR,
           edgecolor="black", linewidth=0.6, label="accuracy")
    ax.bar(left[filled], bins.mean_confidence[filled] - bins.accuracy[filled], bottom=bins.accuracy[filled],
           width=width, align="edge", color=_GAP_COLOR, alpha=0.35, hatch="//", edgecolor=_GAP_COLOR,
           linewidth=0.6, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax.set_title(f"{title}\nECE {ece_from_bins(bins):.3f} · n = {missing.size} · "
                 f"missing confidence {missing.mean():.1%}")
    ax.legend(loc="upper left")

    ax_counts.bar(left, bins.counts, width=width, align="edge", color="grey", edgecolor="black", linewidth=0.6)
    for x, count in zip(left[filled] + width / 2, bins.counts[filled]):
        ax_counts.annotate(str(count), (x, count), ha="center", va="bottom", fontsize=7)
    ax_counts.set(xlabel="stated confidence", ylabel="count", ylim=(0, max(bins.counts.max() * 1.25, 1)))
    return _save_png_atomic(fig, path)


def plot_confidence_histogram(confidences: Sequence[float | None] | np.ndarray,
                              correct: Sequence[bool] | np.ndarray, path: str | Path, title: str,
                              n_bins: int = 20) -> Path:
    """Stacked histogram of stated confidence, correct below incorrect; missing ones counted in the legend.

    Binning is ``metrics.bin_indices``, so a value on an edge lands where it does in the ECE.
    """
    conf, missing, corr = validate_predictions(confidences, correct)
    present = ~missing
    idx = bin_indices(conf[present], n_bins)
    n_correct = np.bincount(idx[corr[present]], minlength=n_bins)
    n_incorrect = np.bincount(idx[~corr[present]], minlength=n_bins)
    left, width = np.arange(n_bins) / n_bins, 1.0 / n_bins

    fig = _new_figure(6.0, 4.0)
    ax = fig.subplots()
    ax.bar(left, n_correct, width=width, align="edge", color=_CORRECT_COLOR, edgecolor="black",
           linewidth=0.6, label=f"correct ({int(n_correct.sum())})")
    ax.bar(left, n_incorrect, bottom=n_correct, width=width, align="edge", color=_INCORRECT_COLOR,
           edgecolor="black", linewidth=0.6, label=f"incorrect ({int(n_incorrect.sum())})")
    handles, _ = ax.get_legend_handles_labels()
    n_missing = int(missing.sum())
    handles.append(Patch(facecolor="none", edgecolor="none",
                         label=f"missing confidence: {n_missing} ({n_missing / missing.size:.1%})"))
    ax.legend(handles=handles, loc="upper left")
    # Headroom above the tallest bar for the legend.
    ax.set(xlim=(0, 1), ylim=(0, max((n_correct + n_incorrect).max() * 1.35, 1)), xlabel="stated confidence",
           ylabel="count", title=title)
    return _save_png_atomic(fig, path)


def plot_risk_coverage(arms: Mapping[str, tuple[Sequence[float | None] | np.ndarray, Sequence[bool] | np.ndarray]],
                       path: str | Path, title: str) -> Path:
    """Selective risk against coverage (answer only the most confident predictions), one curve per arm with its
    AURC in the legend: a confidence that ranks well keeps the risk low at low coverage."""
    fig = _new_figure(6.0, 4.2)
    ax = fig.subplots()
    for name, (confidences, correct) in arms.items():
        coverage, risk = risk_coverage(confidences, correct)
        ax.plot(coverage, risk, linewidth=1.4, label=f"{name} (AURC {aurc(confidences, correct):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="coverage (share answered, most confident first)",
           ylabel="selective risk (error rate of the answered)", title=title)
    ax.legend(loc="upper left")
    return _save_png_atomic(fig, path)


def plot_training_curves(log: Sequence[Mapping[str, float]], path: str | Path, title: str) -> Path:
    """Loss, the sampled accuracy against the stated confidence, and the mean target P, per training step.

    The gap between the two middle curves is the overconfidence the training creates or removes.
    """
    steps = [r["step"] for r in log]
    fig = _new_figure(9.0, 3.4)
    loss_ax, cal_ax = fig.subplots(1, 2)
    loss_ax.plot(steps, [r["loss"] for r in log], color=_CORRECT_COLOR, label="loss")
    if any(r.get("confidence_ce") for r in log):
        loss_ax.plot(steps, [r["confidence_ce"] for r in log], color=_GAP_COLOR, label="confidence CE")
    loss_ax.set_xlabel("step")
    loss_ax.set_title("loss")
    loss_ax.legend(loc="upper right")
    cal_ax.plot(steps, [r["sample_accuracy"] for r in log], color=_CORRECT_COLOR, label="sampled accuracy")
    cal_ax.plot(steps, [r["mean_stated_confidence"] for r in log], color=_INCORRECT_COLOR,
                label="stated confidence (samples)")
    cal_ax.set_ylim(0.0, 1.05)
    cal_ax.set_xlabel("step")
    cal_ax.set_title("accuracy vs confidence")
    cal_ax.legend(loc="lower right")
    fig.suptitle(title)
    return _save_png_atomic(fig, path)


def plot_routing(curves: Mapping[str, object], chosen: Mapping[str, Mapping[str, object]], target_accuracy: float,
                 large_cost: float, large_accuracy: float, path: str | Path, title: str) -> Path:
    """Cascade accuracy against mean cost per prompt, one curve per small model (``routing.RoutingCurve``), with
    the cheapest point reaching the target marked and the always-large model as a star."""
    fig = _new_figure(6.5, 4.5)
    ax = fig.subplots()
    for name, curve in curves.items():
        (line,) = ax.plot(curve.cost, curve.accuracy, marker=".", markersize=3, linewidth=1.2, label=name)
        point = chosen.get(name, {})
        if point.get("reachable"):
            ax.plot([point["cost_per_prompt"]], [point["accuracy"]], "o", color=line.get_color(), markersize=8,
                    markerfacecolor="none", label=f"{name}: cost {point['cost_per_prompt']:.2f} at "
                                                  f"≥ {target_accuracy:.2f}")
    ax.plot([large_cost], [large_accuracy], "*", color="black", markersize=11, label="large model on every prompt")
    ax.axhline(target_accuracy, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="mean cost per prompt (small model = 1 unit each call)", ylabel="accuracy", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _save_png_atomic(fig, path)


def plot_compare(sets: Mapping[str, Mapping[str, Mapping[str, object]]], path: str | Path) -> Path:
    """Accuracy against ECE per arm, one panel per prompt set, with the bootstrap intervals as error bars: the
    lower right is calibrated and accurate. ``sets[set][arm]`` holds the metrics and their ``intervals``."""
    fig = _new_figure(5.2 * len(sets), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(sets)))
    for ax, (set_name, arms) in zip(axes, sets.items()):
        for name, metrics in arms.items():
            ece, acc = float(metrics["ece"]), float(metrics["accuracy"])
            intervals = metrics.get("intervals") or {}

            def err(key: str, value: float, intervals=intervals) -> list[list[float]] | None:
                if key not in intervals:
                    return None
                low, high = intervals[key]
                return [[max(0.0, value - low)], [max(0.0, high - value)]]

            ax.errorbar([ece], [acc], xerr=err("ece", ece), yerr=err("accuracy", acc), fmt="o", capsize=3,
                        label=name)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="ECE (lower is better)", ylabel="accuracy",
               title=set_name.replace("_", "-"))
    axes[0].legend(loc="lower left", fontsize=8)  # the colour cycle gives each arm one colour in every panel
    return _save_png_atomic(fig, path)
