"""Continual learning: both arms train on task A then on task B from A's model; the report scores A before and after."""

import json

import pytest

from caopd.cli import main
from caopd.config.experiments import ContinualConfig


@pytest.mark.slow
def test_continual_run_scores_task_a_before_and_after_task_b(tmp_path, capsys):
    out = tmp_path / "continual"
    assert main(["continual", "--out", str(out), "--quiet", "--n-train", "6", "--n-eval", "8", "--k", "2",
                 "--train.steps", "1", "--train.prompts-per-step", "2", "--task-a-kinds", "add_1x1",
                 "--task-b-kinds", "mul_1x1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["task_a"]) == {"base", "opd_after_a", "opd_after_b", "caopd_after_a", "caopd_after_b"}
    for method in ("opd", "caopd"):
        f = summary["forgetting"][method]
        assert f["ece_a_before"] == summary["task_a"][f"{method}_after_a"]["ece"]
        assert f["ece_a_after"] == summary["task_a"][f"{method}_after_b"]["ece"]
        # the second training started from the first one's model, on task B's prompts
        trained = json.loads((out / method / "after_b" / "train" / "summary.json").read_text())["config"]
        assert trained["model"] == str(out / method / "after_a" / "train" / "model")
    kinds = {json.loads(line)["kind"] for line in (out / "data_b" / "train.jsonl").open()}
    assert kinds == {"mul_1x1"}
    assert "ECE on A after B" in capsys.readouterr().out and (out / "report.md").is_file()


@pytest.mark.parametrize("bad, message", [
    ({"task_a_kinds": ["add_1x1"], "task_b_kinds": ["add_1x1"]}, "no kind in both"),
    ({"task_b_kinds": ["div_2x2"]}, "unknown arithmetic kinds"),
])
def test_bad_task_splits_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ContinualConfig(**bad)
