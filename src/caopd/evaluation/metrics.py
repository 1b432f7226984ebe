"""Calibration metrics: the one home of ECE, Brier, AUROC, Strict Pairwise Ranking and their binning.

Conventions (docs/method.md, "Metrics"):

* A missing confidence (None or NaN) counts as 0.0 in every metric; its share is ``missing_rate``.
* ECE uses ``n_bins`` equal-width bins; a confidence on an edge belongs to the bin it opens (0.3 is in
  [0.3, 0.4)), and 1.0 falls in the last bin.
* AUROC = P(c+ > c-) + 1/2 P(c+ = c-) over (correct, incorrect) pairs, NaN with only one class;
  Strict Pairwise Ranking counts only strict wins and is 0.0 with only one class.

Everything is vectorised numpy, O(n log n) at worst, so a million predictions take well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caopd.errors import CaopdInputError

METRIC_KEYS: tuple[str, ...] = (
    "accuracy", "ece", "brier", "auroc", "spr", "mean_confidence", "overconfidence_gap", "missing_rate",
)

# Decimals kept when scaling a confidence to bin units: enough to absorb float error such as
# 0.7 * 10 == 6.999999999999999, far too few to move a genuinely different confidence across an edge.
_BIN_ROUND_DECIMALS = 9


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics; ``mean_confidence`` and ``accuracy`` are NaN in empty bins."""

    edges: np.ndarray            # n_bins + 1 edges, edges[i] opens bin i
    counts: np.ndarray           # int64, predictions per bin
    mean_confidence: np.ndarray  # float64
    accuracy: np.ndarray         # float64


def validate_predictions(confidences: Sequence[float | None] | np.ndarray, correct: Sequence[bool] | np.ndarray,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence with missing as 0.0, missing mask, correct as bool) as arrays; ValueError on bad input.

    Every metric and plot goes through here, so "missing counts as 0.0" is decided in one place.
    """
    conf = np.asarray(confidences, dtype=np.float64)  # None becomes NaN
    raw_correct = np.asarray(correct)
    if conf.ndim != 1 or raw_correct.ndim != 1:
        raise ValueError("confidences and correct must be one-dimensional")
    if conf.shape != raw_correct.shape:
        raise ValueError(f"{conf.size} confidences but {raw_correct.size} correctness labels")
    if conf.size == 0:
        raise ValueError("no predictions to score")
    if raw_correct.dtype != np.bool_ and not np.isin(raw_correct, (0, 1)).all():
        raise ValueError("correct must hold booleans (or 0/1)")
    missing = np.isnan(conf)
    present = conf[~missing]
    if present.size and (present.min() < 0.0 or present.max() > 1.0):
        # Also rejects +-inf. The protocol parser clips, so an out-of-range value here is a bug upstream.
        raise ValueError("confidences must lie in [0, 1] (or be None/NaN for missing)")
    return np.where(missing, 0.0, conf), missing, raw_correct.astype(bool)


def bin_indices(confidences: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Bin of each confidence in [0, 1]: ``floor(c * n_bins)`` with edges opening their bin, 1.0 in the last.

    Rounding before the floor makes 0.3, 0.6 and 0.7 land in bins 3, 6 and 7, where plain float math
    (or ``np.linspace`` edges with ``searchsorted``) puts them one bin low.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    scaled = np.round(np.asarray(confidences, dtype=np.float64) * n_bins, _BIN_ROUND_DECIMALS)
    return np.clip(np.floor(scaled).astype(np.int64), 0, n_bins - 1)


def _reliability(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> ReliabilityBins:
    idx = bin_indices(conf, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = conf_sum / counts
        acc = correct_sum / counts
    return ReliabilityBins(np.linspace(0.0, 1.0, n_bins + 1), counts, mean_conf, acc)


def ece_from_bins(bins: ReliabilityBins) -> float:
    """Expected calibration error: sum over bins of (n_b / N) * |accuracy_b - mean confidence_b|."""
    filled = bins.counts > 0
    weights = bins.counts[filled] / bins.counts.sum()
    return float(np.sum(weights * np.abs(bins.accuracy[filled] - bins.mean_confidence[filled])))


def reliability_bins(confidences: Sequence[float | None] | np.ndarray, correct: Sequence[bool] | np.ndarray,
                     n_bins: int = 10) -> ReliabilityBins:
    """Counts, mean confidence and accuracy per equal-width bin (missing confidences count as 0.0)."""
    conf, _, corr = validate_predictions(confidences, correct)
    return _reliability(conf, corr, n_bins)


def _ranking(conf: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """(AUROC, Strict Pairwise Ranking) over all (correct, incorrect) pairs.

    For each correct prediction, binary search in the sorted incorrect ones counts the pairs it wins
    strictly and the pairs it ties: O(n log n) instead of the O(n^2) pair loop.
    """
    pos, neg = conf[correct], np.sort(conf[~correct])
    pairs = pos.size * neg.size
    if pairs == 0:
        return math.nan, 0.0
    below = np.searchsorted(neg, pos, side="left")
    not_above = np.searchsorted(neg, pos, side="right")
    wins = int(below.sum())
    ties = int((not_above - below).sum())
    return (wins + 0.5 * ties) / pairs, wins / pairs


def calibration_metrics(confidences: Sequence[float | None] | np.ndarray, correct: Sequence[bool] | np.ndarray,
                        n_bins: int = 10) -> dict[str, float | int]:
    """All calibration metrics of one set of predictions, keyed by ``METRIC_KEYS`` plus ``n``.

    Values are plain Python floats (``n`` an int) so the dict serialises to JSON and MLflow as is.
    """
    conf, missing, corr = validate_predictions(confidences, correct)
    auroc, spr = _ranking(conf, corr)
    accuracy = float(corr.mean())
    mean_confidence = float(conf.mean())
    return {
        "accuracy": accuracy,
        "ece": ece_from_bins(_reliability(conf, corr, n_bins)),
        "brier": float(np.mean((conf - corr) ** 2)),
        "auroc": auroc,
        "spr": spr,
        "mean_confidence": mean_confidence,
        "overconfidence_gap": mean_confidence - accuracy,
        "missing_rate": float(missing.mean()),
        "n": int(conf.size),
    }


def metrics_by_group(confidences: Sequence[float | None] | np.ndarray, correct: Sequence[bool] | np.ndarray,
                     groups: Sequence[str], n_bins: int = 10) -> dict[str, dict[str, float | int]]:
    """``calibration_metrics`` of each group's predictions (e.g. per arithmetic kind), groups in sorted order: where
    a model's calibration holds and where it breaks, which one pooled figure averages away."""
    raw = np.asarray(confidences, dtype=np.float64)
    corr = np.asarray(correct)
    labels = np.asarray(groups, dtype=object)
    if not raw.shape == corr.shape == labels.shape:
        raise ValueError(f"confidences, correct and groups differ in length: {raw.size}, {corr.size}, {labels.size}")
    return {str(group): calibration_metrics(raw[labels == group], corr[labels == group], n_bins)
            for group in sorted(set(labels.tolist()))}


def risk_coverage(confidences: Sequence[float | None] | np.ndarray, correct: Sequence[bool] | np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, selective risk) when answering the k most confident predictions, k = 1..n.

    Tied confidences cannot be ordered, so within a tie the errors are spread evenly (the expectation over
    every order of the tie): the curve does not depend on how a sort breaks ties.
    """
    conf, _, corr = validate_predictions(confidences, correct)
    order = np.argsort(-conf, kind="stable")
    conf, errors = conf[order], (~corr[order]).astype(np.float64)
    n = conf.size
    starts = np.flatnonzero(np.r_[True, conf[1:] != conf[:-1]])  # first position of each tie group
    sizes = np.diff(np.r_[starts, n])
    group_errors = np.add.reduceat(errors, starts)
    before = np.r_[0.0, np.cumsum(group_errors)[:-1]]
    group = np.repeat(np.arange(starts.size), sizes)
    k = np.arange(1, n + 1)
    expected_errors = before[group] + (k - starts[group]) * group_errors[group] / sizes[group]
    return k / n, expected_errors / k


def aurc(confidences: Sequence[float | None] | np.ndarray, correct: Sequence[bool] | np.ndarray) -> float:
    """Area under the risk–coverage curve: the mean selective risk over k = 1..n (lower is better; a perfect
    ranking of a model with error rate e gives about e + (1 − e)·ln(1 − e))."""
    return float(risk_coverage(confidences, correct)[1].mean())


def bootstrap_intervals(confidences: Sequence[float | None] | np.ndarray, correct: Sequence[bool] | np.ndarray,
                        n_resamples: int = 1000, level: float = 0.95, seed: int = 0, n_bins: int = 10,
                        ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric (``METRIC_KEYS`` and ``aurc``): resample the predictions
    with replacement ``n_resamples`` times, recompute, take the central ``level`` of the values. Seeded."""
    if n_resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError("n_resamples must be >= 1 and level in (0, 1)")
    raw = np.asarray(confidences, dtype=np.float64)
    conf, _, corr = validate_predictions(raw, correct)
    rng = np.random.default_rng(seed)
    keys = (*METRIC_KEYS, "aurc")
    samples = {key: np.empty(n_resamples) for key in keys}
    for r in range(n_resamples):
        idx = rng.integers(0, conf.size, conf.size)
        values = calibration_metrics(raw[idx], corr[idx], n_bins)
        values["aurc"] = aurc(conf[idx], corr[idx])
        for key in keys:
            samples[key][r] = values[key]
    tail = (1.0 - level) / 2 * 100
    return {key: (float(np.nanpercentile(v, tail)), float(np.nanpercentile(v, 100 - tail)))
            if not np.isnan(v).all() else (math.nan, math.nan) for key, v in samples.items()}


def parse_prediction(record: dict, path: str, row: int) -> tuple[float, bool]:
    for key in ("confidence", "correct"):
        if key not in record:
            raise CaopdInputError("missing (every line needs 'confidence' and 'correct')",
                                  file=path, row=row, field=key)
    correct = record["correct"]
    if not isinstance(correct, bool):
        raise CaopdInputError(f"expected true or false, got {correct!r}", file=path, row=row, field="correct")
    confidence = record["confidence"]
    if confidence is None:
        return math.nan, correct
    # bool is an int subclass in Python, but true/false is not a confidence. json.loads accepts NaN and
    # Infinity, which the range check rejects.
    is_number = isinstance(confidence, (int, float)) and not isinstance(confidence, bool)
    if not is_number or not 0.0 <= confidence <= 1.0:
        raise CaopdInputError(f"expected a number in [0, 1] or null, got {confidence!r}",
                              file=path, row=row, field="confidence")
    return float(confidence), correct


def read_prediction_records(path: str | Path) -> list[dict]:
    """The records of a predictions JSONL file; an empty file is an error naming it."""
    from caopd.io import read_jsonl

    records = read_jsonl(path)
    if not records:
        raise CaopdInputError("no predictions (the file is empty)", file=str(path))
    return records


def load_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a predictions JSONL file: one ``{"confidence": float | null, "correct": bool}`` per line.

    Returns (confidences with NaN for missing, correct as bool). Blank lines are skipped; other keys are
    ignored. Bad input raises ``CaopdInputError`` naming the file, the row and the field.
    """
    records = read_prediction_records(path)
    parsed = [parse_prediction(record, str(path), row) for row, record in enumerate(records)]
    return (np.asarray([c for c, _ in parsed], dtype=np.float64), np.asarray([y for _, y in parsed], dtype=bool))
