"""Cascade routing: the threshold sweep pinned on hand-made cases, the inference-time router, `caopd route`."""

import json
import math

import numpy as np
import pytest

from caopd.cli import main
from caopd.experiments.routing import (
    ConfidenceRouter,
    cheapest_point,
    routing_curve,
    routing_summary,
)

# Four prompts: the small model is right on the two it is sure of (0.9), wrong on 0.2 and 0.5.
CONF, SMALL = [0.2, 0.9, 0.5, 0.9], [False, True, False, True]


def test_sweep_against_a_large_model_given_per_prompt():
    curve = routing_curve(CONF, SMALL, [True, True, True, True], small_cost=1.0, large_cost=10.0)
    # thresholds: escalate below 0.2 (nothing), below 0.5 (the 0.2), below 0.9 (0.2 and 0.5), everything
    assert curve.thresholds.tolist() == [0.2, 0.5, 0.9, math.inf]
    assert curve.escalated.tolist() == [0.0, 0.25, 0.5, 1.0]
    np.testing.assert_allclose(curve.accuracy, [0.5, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(curve.cost, [1.0, 3.5, 6.0, 11.0])  # the small model always runs
    assert cheapest_point(curve, 1.0) == 2  # full accuracy without escalating the confident half
    assert cheapest_point(curve, 0.7) == 1 and cheapest_point(curve, 0.0) == 0
    summary = routing_summary(curve, 1.0, large_cost=10.0)
    assert summary["threshold"] == 0.9 and summary["cost_per_prompt"] == 6.0
    assert summary["saving_vs_large"] == pytest.approx(0.4)


def test_sweep_against_a_stated_large_accuracy_and_unreachable_targets():
    curve = routing_curve(CONF, SMALL, large_accuracy=0.8)
    # escalated prompts count 0.8 each in expectation; escalating the right answers too costs accuracy
    np.testing.assert_allclose(curve.accuracy, [0.5, 0.7, 0.9, 0.8])
    assert cheapest_point(curve, 0.85) == 2
    assert routing_summary(curve, 0.95, 10.0) == {"target_accuracy": 0.95, "reachable": False, "best_accuracy": 0.9}


def test_escalating_everything_reports_no_threshold():
    curve = routing_curve([0.9, 0.9], [False, False], [True, True])
    assert routing_summary(curve, 1.0, 10.0)["threshold"] is None  # escalate every prompt


def test_missing_confidence_counts_as_zero_and_is_escalated_first():
    curve = routing_curve([None, 0.6], [True, False], [False, True])
    assert curve.thresholds.tolist() == [0.0, 0.6, math.inf]
    np.testing.assert_allclose(curve.accuracy, [0.5, 0.0, 0.5])


def test_bad_routing_inputs_are_refused():
    with pytest.raises(ValueError, match="not both"):
        routing_curve(CONF, SMALL, [True] * 4, large_accuracy=0.9)
    with pytest.raises(ValueError, match="4 small-model predictions but 3"):
        routing_curve(CONF, SMALL, [True] * 3)


def test_router_escalates_low_and_missing_confidence():
    router = ConfidenceRouter(threshold=0.5)
    assert router.escalate(None) and router.escalate(0.49) and not router.escalate(0.5)
    assert not router.escalate_completion("408\nConfidence: 0.90")
    assert router.escalate_completion("408")  # no Confidence line: missing


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_route_command_compares_small_models_at_equal_accuracy(tmp_path):
    ids = ["a", "b", "c", "d"]
    calibrated = _write(tmp_path / "caopd.jsonl", [{"prompt_id": i, "confidence": c, "correct": y}
                                                    for i, c, y in zip(ids, CONF, SMALL)])
    overconfident = _write(tmp_path / "opd.jsonl", [{"prompt_id": i, "confidence": 1.0, "correct": y}
                                                     for i, y in zip(ids, SMALL)])
    large = _write(tmp_path / "large.jsonl", [{"prompt_id": i, "confidence": 0.5, "correct": True} for i in ids[::-1]])
    out = tmp_path / "route"
    assert main(["route", "--small", calibrated, "--small", f"overconfident={overconfident}", "--large", large,
                 "--target-accuracy", "1.0", "--out", str(out)]) == 0
    summary = json.loads((out / "routing.json").read_text())
    assert summary["large_accuracy"] == 1.0
    assert summary["small"]["caopd"]["cost_per_prompt"] == 6.0
    # all confidences equal: the only way to full accuracy is to escalate everything
    assert summary["small"]["overconfident"]["cost_per_prompt"] == 11.0
    assert summary["small"]["overconfident"]["threshold"] is None
    assert (out / "routing.png").stat().st_size > 0 and "| caopd |" in (out / "routing.md").read_text()


def test_route_command_names_the_file_row_and_field_of_bad_input(tmp_path, capsys):
    small = _write(tmp_path / "small.jsonl", [{"prompt_id": "a", "confidence": 0.5, "correct": True},
                                              {"confidence": 0.5, "correct": False}])
    assert main(["route", "--small", small, "--large-accuracy", "0.9", "--target-accuracy", "0.8",
                 "--out", str(tmp_path / "out")]) == 2
    assert f"{small}: row 1: field 'prompt_id'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    small = _write(tmp_path / "small2.jsonl", [{"prompt_id": "a", "confidence": 0.5, "correct": True}])
    large = _write(tmp_path / "large.jsonl", [{"prompt_id": "b", "confidence": 0.5, "correct": True}])
    assert main(["route", "--small", small, "--large", large, "--target-accuracy", "0.8",
                 "--out", str(tmp_path / "out")]) == 2
    assert "no large-model prediction" in capsys.readouterr().err
