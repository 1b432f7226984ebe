"""Calibration metrics pinned against hand-computed values, a naive reference, and bad prediction files."""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from caopd.errors import CaopdInputError
from caopd.evaluation.metrics import (
    METRIC_KEYS,
    bin_indices,
    calibration_metrics,
    load_predictions,
    metrics_by_group,
    reliability_bins,
)

TOL = 1e-6


def assert_metrics(got: dict, expected: dict) -> None:
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=TOL), key


def test_keys_and_plain_python_types():
    m = calibration_metrics([0.5, None], [True, False])
    assert set(METRIC_KEYS) <= set(m) and set(m) - set(METRIC_KEYS) == {"n"}
    assert all(type(m[k]) is float for k in METRIC_KEYS)
    assert type(m["n"]) is int and m["n"] == 2


def test_mixed_case_with_tie_and_missing():
    # c = [0.9, 0.8, 0.8, 0.3, None->0.0], y = [1, 1, 0, 0, 1]
    # accuracy = 3/5 = 0.6; mean confidence = (0.9+0.8+0.8+0.3+0)/5 = 2.8/5 = 0.56; gap = 0.56-0.6 = -0.04
    # Brier = (0.1² + 0.2² + 0.8² + 0.3² + 1²)/5 = (0.01+0.04+0.64+0.09+1)/5 = 1.78/5 = 0.356
    # pairs: correct {0.9, 0.8, 0.0} x incorrect {0.8, 0.3} = 6
    #   0.9>0.8 ✓, 0.9>0.3 ✓, 0.8=0.8 tie, 0.8>0.3 ✓, 0.0<0.8, 0.0<0.3  -> wins 3, ties 1
    #   AUROC = (3 + 0.5)/6 = 0.583333; SPR = 3/6 = 0.5
    # ECE bins: [0.9] bin9 acc 1 conf .9 -> .1; [0.8, 0.8] bin8 acc .5 conf .8 -> .3 (x2);
    #   [0.3] bin3 acc 0 conf .3 -> .3; [0.0] bin0 acc 1 conf 0 -> 1
    #   ECE = (1*.1 + 2*.3 + 1*.3 + 1*1)/5 = 2.0/5 = 0.4
    m = calibration_metrics([0.9, 0.8, 0.8, 0.3, None], [True, True, False, False, True])
    assert_metrics(m, {"accuracy": 0.6, "mean_confidence": 0.56, "overconfidence_gap": -0.04, "brier": 0.356,
                       "auroc": 3.5 / 6, "spr": 0.5, "ece": 0.4, "missing_rate": 0.2})


def test_nan_counts_as_missing_like_none():
    with_none = calibration_metrics([0.9, None, 0.4], [True, False, True])
    with_nan = calibration_metrics(np.array([0.9, np.nan, 0.4]), np.array([True, False, True]))
    assert with_none == pytest.approx(with_nan, nan_ok=True)
    assert with_nan["missing_rate"] == pytest.approx(1 / 3)


def test_all_missing():
    # c = [0, 0], y = [1, 0]: mean conf 0, missing 1; Brier (1 + 0)/2 = 0.5
    # ECE: one bin (bin0), acc .5 conf 0 -> .5; one pair, a tie -> AUROC .5, SPR 0
    m = calibration_metrics([None, None], [True, False])
    assert_metrics(m, {"accuracy": 0.5, "mean_confidence": 0.0, "missing_rate": 1.0, "brier": 0.5,
                       "ece": 0.5, "auroc": 0.5, "spr": 0.0, "overconfidence_gap": -0.5})


def test_extreme_confidences_zero_and_one():
    # c = [1, 0, 1, 0], y = [1, 0, 0, 1]: accuracy .5, mean conf .5, gap 0
    # Brier = (0 + 0 + 1 + 1)/4 = 0.5
    # ECE: 1.0 -> last bin (bin9): acc .5 conf 1 -> .5 (x2); 0.0 -> bin0: acc .5 conf 0 -> .5 (x2) -> ECE .5
    # pairs: correct {1, 0} x incorrect {0, 1}: 1>0 ✓, 1=1 tie, 0=0 tie, 0<1 -> AUROC (1+1)/4 = .5, SPR 1/4
    m = calibration_metrics([1.0, 0.0, 1.0, 0.0], [True, False, False, True])
    assert_metrics(m, {"accuracy": 0.5, "mean_confidence": 0.5, "overconfidence_gap": 0.0, "brier": 0.5,
                       "ece": 0.5, "auroc": 0.5, "spr": 0.25, "missing_rate": 0.0})
    bins = reliability_bins([1.0, 0.0, 1.0, 0.0], [True, False, False, True])
    assert bins.counts.tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]


def test_perfect_predictor():
    # c = [1, 1, 0], y = [1, 1, 0]: every bin's accuracy equals its confidence; both pairs strictly right;
    # mean confidence 2/3 = accuracy 2/3 -> gap 0
    m = calibration_metrics([1.0, 1.0, 0.0], [True, True, False])
    assert_metrics(m, {"ece": 0.0, "brier": 0.0, "auroc": 1.0, "spr": 1.0, "overconfidence_gap": 0.0})


def test_always_confident_opd_student_has_ece_one_minus_accuracy():
    # every c = 1.0, accuracy .25: ECE = |.25 - 1| = .75; all pairs tie -> AUROC .5, SPR 0
    m = calibration_metrics([1.0] * 4, [True, False, False, False])
    assert_metrics(m, {"ece": 0.75, "auroc": 0.5, "spr": 0.0, "overconfidence_gap": 0.75, "brier": 0.75})


@pytest.mark.parametrize("correct, ece, brier", [
    # all correct: ECE = (|1-.2| + |1-.9|)/2 = .45; Brier = (.8² + .1²)/2 = (.64+.01)/2 = .325
    ([True, True], 0.45, 0.325),
    # all wrong: ECE = (.2 + .9)/2 = .55; Brier = (.04 + .81)/2 = .425
    ([False, False], 0.55, 0.425),
])
def test_single_class_auroc_nan_spr_zero(correct, ece, brier):
    m = calibration_metrics([0.2, 0.9], correct)
    assert_metrics(m, {"auroc": math.nan, "spr": 0.0, "ece": ece, "brier": brier,
                       "accuracy": float(all(correct))})


@pytest.mark.parametrize("edge, below", [(0.3, 0.25), (0.6, 0.55), (0.7, 0.65)])
def test_edge_confidence_belongs_to_the_bin_it_opens(edge, below):
    # Right binning: edge alone in its bin -> |1 - edge|; `below` alone one bin lower -> |0 - below|.
    #   0.3: (.7 + .25)/2 = .475   0.6: (.4 + .55)/2 = .475   0.7: (.3 + .65)/2 = .475
    # Binning the edge one bin low would merge both (acc .5): e.g. 0.3: |.5 - .275| = .225.
    m = calibration_metrics([edge, below], [True, False])
    assert m["ece"] == pytest.approx(0.475, abs=TOL)


def test_bin_indices_of_every_edge():
    edges = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert bin_indices(np.array(edges)).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]
    # Values computed by float arithmetic that lands a hair off the edge still open their bin.
    assert bin_indices(np.array([0.1 + 0.2, 0.7 * 1.0, 1 - 0.3, 0.29, 0.999])).tolist() == [3, 7, 7, 2, 9]
    assert bin_indices(np.array([0.05, 0.3, 0.95, 1.0]), n_bins=20).tolist() == [1, 6, 19, 19]


def test_reliability_bins_stats():
    # bin3: [0.3, 0.35] acc 1/2, mean conf .325; bin9: [1.0] acc 1; other bins empty (NaN)
    bins = reliability_bins([0.3, 0.35, 1.0], [True, False, True])
    assert bins.counts.tolist() == [0, 0, 0, 2, 0, 0, 0, 0, 0, 1]
    assert bins.mean_confidence[3] == pytest.approx(0.325) and bins.accuracy[3] == pytest.approx(0.5)
    assert bins.accuracy[9] == 1.0 and np.isnan(bins.accuracy[0]) and np.isnan(bins.mean_confidence[5])
    assert bins.edges[0] == 0.0 and bins.edges[-1] == 1.0 and bins.edges.size == 11


@pytest.mark.parametrize("confidences, correct", [
    ([1.2], [True]), ([-0.1], [True]), ([math.inf], [True]), ([0.5], [True, False]), ([], []), ([0.5], [2]),
])
def test_invalid_arrays_raise(confidences, correct):
    with pytest.raises(ValueError):
        calibration_metrics(confidences, correct)


# -- against a naive reference ---------------------------------------------------------------------------

def naive_metrics(conf: list[float | None], correct: list[bool], n_bins: int = 10) -> dict[str, float]:
    """O(n²) pairs and a per-sample bin loop using the decimal the value was written as."""
    c = [0.0 if x is None else x for x in conf]
    wins = ties = pairs = 0
    for ci, yi in zip(c, correct):
        for cj, yj in zip(c, correct):
            if yi and not yj:
                pairs += 1
                wins += ci > cj
                ties += ci == cj
    sums = {}
    for ci, yi in zip(c, correct):
        b = min(int(Decimal(repr(ci)) * n_bins), n_bins - 1)
        n, s_conf, s_acc = sums.get(b, (0, 0.0, 0.0))
        sums[b] = (n + 1, s_conf + ci, s_acc + yi)
    ece = sum(n / len(c) * abs(s_acc / n - s_conf / n) for n, s_conf, s_acc in sums.values())
    return {"auroc": (wins + 0.5 * ties) / pairs if pairs else math.nan, "spr": wins / pairs if pairs else 0.0,
            "ece": ece, "brier": sum((ci - yi) ** 2 for ci, yi in zip(c, correct)) / len(c)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_naive_reference(seed):
    rng = np.random.default_rng(seed)
    n = 300
    # Two-decimal values: plenty of ties and values exactly on bin edges; ~10 % missing.
    conf: list[float | None] = [round(float(x), 2) for x in rng.random(n)]
    conf[:15] = [0.0, 1.0, 0.3, 0.6, 0.7, 0.1, 0.2, 0.4, 0.5, 0.8, 0.9, 0.3, 0.6, 0.7, 1.0]
    for i in rng.choice(n, size=30, replace=False):
        conf[i] = None
    correct = [bool(b) for b in rng.random(n) < np.nan_to_num(np.array(conf, dtype=float), nan=0.2)]
    got = calibration_metrics(conf, correct)
    want = naive_metrics(conf, correct)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=TOL), key


def test_million_predictions():  # how fast: benchmarks' metrics case, not a timed assertion here
    rng = np.random.default_rng(0)
    conf = np.round(rng.random(1_000_000), 2)
    conf[::17] = np.nan
    correct = rng.random(1_000_000) < np.nan_to_num(conf)
    m = calibration_metrics(conf, correct)
    assert m["n"] == 1_000_000 and 0.0 <= m["ece"] < 0.05
    assert m["missing_rate"] == pytest.approx(1 / 17, abs=1e-5)


def test_metrics_by_group_hand_computed():
    got = metrics_by_group([0.9, 0.8, None, 0.3, 0.6], [True, False, True, False, True], ["a", "a", "b", "b", "c"])
    assert list(got) == ["a", "b", "c"]
    # a: 0.9 (right) in bin 9, 0.8 (wrong) in bin 8 -> ECE = 0.5 * 0.1 + 0.5 * 0.8
    assert_metrics(got["a"], {"accuracy": 0.5, "mean_confidence": 0.85, "ece": 0.45, "brier": (0.01 + 0.64) / 2,
                              "auroc": 1.0, "missing_rate": 0.0})
    # b: the missing confidence counts as 0.0 (right, bin 0), 0.3 (wrong, bin 3) -> ECE = 0.5 * 1 + 0.5 * 0.3
    assert_metrics(got["b"], {"accuracy": 0.5, "mean_confidence": 0.15, "ece": 0.65, "missing_rate": 0.5,
                              "auroc": 0.0, "spr": 0.0})
    assert_metrics(got["c"], {"accuracy": 1.0, "ece": 0.4, "overconfidence_gap": -0.4})
    assert got["c"]["n"] == 1


def test_metrics_by_group_refuses_unequal_lengths():
    with pytest.raises(ValueError, match="differ in length: 2, 2, 1"):
        metrics_by_group([0.5, 0.5], [True, False], ["a"])


# -- load_predictions --------------------------------------------------------------------------------------

def write(tmp_path: Path, content: str | bytes, name: str = "preds.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def test_load_predictions_round_trip(tmp_path):
    path = write(tmp_path, '{"confidence": 0.9, "correct": true, "prompt_id": 7}\n\n'
                           '{"confidence": null, "correct": false}\r\n'
                           '{"confidence": 1, "correct": true}\n   \n')
    conf, correct = load_predictions(path)
    assert conf[0] == 0.9 and np.isnan(conf[1]) and conf[2] == 1.0 and conf.dtype == np.float64
    assert correct.tolist() == [True, False, True] and correct.dtype == bool
    assert calibration_metrics(conf, correct)["missing_rate"] == pytest.approx(1 / 3)


def test_load_predictions_accepts_utf8_bom(tmp_path):
    conf, _ = load_predictions(write(tmp_path, b'\xef\xbb\xbf{"confidence": 0.5, "correct": true}\n'))
    assert conf.tolist() == [0.5]


GOOD = '{"confidence": 0.5, "correct": true}\n'


@pytest.mark.parametrize("bad_line, field", [
    (b'{"confidence": 0.5, "correct": tr\xffue}', None),      # not UTF-8
    (b'{"confidence": 0.5, "correct": true', None),            # invalid JSON
    (b'[0.5, true]', None),                                    # not an object
    (b'{"confidence": 0.5}', "correct"),                        # missing key
    (b'{"correct": true}', "confidence"),                       # missing key
    (b'{"confidence": 0.5, "correct": "yes"}', "correct"),      # non-bool
    (b'{"confidence": 0.5, "correct": 1}', "correct"),          # 1 is not a bool
    (b'{"confidence": "0.5", "correct": true}', "confidence"),  # a string
    (b'{"confidence": true, "correct": true}', "confidence"),   # a bool
    (b'{"confidence": NaN, "correct": true}', "confidence"),
    (b'{"confidence": Infinity, "correct": true}', "confidence"),
    (b'{"confidence": -Infinity, "correct": true}', "confidence"),
    (b'{"confidence": 1.7, "correct": true}', "confidence"),    # out of [0, 1]
    (b'{"confidence": -0.01, "correct": true}', "confidence"),
])
def test_load_predictions_bad_line(tmp_path, bad_line, field):
    # Line 1 good, line 2 blank, line 3 bad: the error names row 1 (the second record).
    path = write(tmp_path, GOOD.encode() + b"\n" + bad_line + b"\n" + GOOD.encode())
    with pytest.raises(CaopdInputError) as info:
        load_predictions(path)
    err = info.value
    assert err.file == str(path) and err.row == 1 and err.field == field
    message = str(err)
    assert str(path) in message and "row 1" in message and "\n" not in message
    if field:
        assert f"field '{field}'" in message


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_load_predictions_empty_file(tmp_path, content):
    path = write(tmp_path, content)
    with pytest.raises(CaopdInputError, match="empty") as info:
        load_predictions(path)
    assert str(path) in str(info.value)


def test_load_predictions_missing_file(tmp_path):
    with pytest.raises(CaopdInputError, match="cannot read"):
        load_predictions(tmp_path / "nope.jsonl")
