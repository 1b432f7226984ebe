"""The command line: exact metrics, bad input (exit 2, one line, nothing written) and the main job end to end."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from caopd.cli import EXIT_BAD_INPUT, main
from caopd.evaluation.metrics import METRIC_KEYS
from caopd.io import write_jsonl
from caopd.tasks.arithmetic import generate_rows


def _metrics(capsys, tmp_path, lines):
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    assert main(["metrics", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= set(METRIC_KEYS)
    return out


def _bad_input(capsys, argv):
    """Run argv, expect exit 2 with exactly one line on stderr; return that line."""
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("caopd: error: ")
    return err


# ------------------------------------------------------------------------------ caopd metrics


def test_metrics_match_hand_computed_values_with_ties_missing_and_edges(capsys, tmp_path):
    # Missing counts as 0.0, so the effective confidences are [1.0, 0.0, 0.5, 0.5, 0.0, 0.9].
    out = _metrics(capsys, tmp_path, [
        {"confidence": 1.0, "correct": True}, {"confidence": 0.0, "correct": False},
        {"confidence": 0.5, "correct": True}, {"confidence": 0.5, "correct": False},
        {"confidence": None, "correct": True}, {"confidence": 0.9, "correct": False},
    ])
    expected = {
        "accuracy": 3 / 6,
        "mean_confidence": 2.9 / 6,
        "overconfidence_gap": 2.9 / 6 - 0.5,
        "brier": (0 + 0 + 0.25 + 0.25 + 1 + 0.81) / 6,
        # bin 0: {0.0 F, 0.0 T} |0 - .5| * 2/6; bin 5: {.5 T, .5 F} 0; bin 9: {1.0 T, .9 F} |.95 - .5| * 2/6
        "ece": 0.5 * 2 / 6 + 0.45 * 2 / 6,
        # 9 (correct, incorrect) pairs: 4 strict wins, 2 ties (0.5/0.5 and 0.0/0.0)
        "auroc": (4 + 0.5 * 2) / 9,
        "spr": 4 / 9,
        "missing_rate": 1 / 6,
    }
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key
    assert out["n"] == 6


def test_metrics_single_class_has_null_auroc_and_zero_spr(capsys, tmp_path):
    out = _metrics(capsys, tmp_path, [{"confidence": 0.8, "correct": True}, {"confidence": 0.6, "correct": True}])
    assert out["auroc"] is None
    assert out["spr"] == 0.0
    assert out["accuracy"] == 1.0
    assert out["ece"] == pytest.approx(0.3, abs=1e-6)  # bins 6 and 8: |.6-1| and |.8-1|, each weight 1/2
    assert out["overconfidence_gap"] == pytest.approx(-0.3, abs=1e-6)


def test_metrics_perfect_ranking_and_certain_confidences(capsys, tmp_path):
    out = _metrics(capsys, tmp_path, [{"confidence": 1.0, "correct": True}, {"confidence": 0.0, "correct": False}])
    assert (out["auroc"], out["spr"], out["ece"], out["brier"]) == (1.0, 1.0, 0.0, 0.0)


def test_metrics_bad_line_names_file_row_and_field(capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"confidence": 0.5, "correct": true}\n{"confidence": 0.5}\n', encoding="utf-8")
    err = _bad_input(capsys, ["metrics", str(path)])
    assert str(path) in err and "row 1" in err and "correct" in err


# ------------------------------------------------------------------------------ bad input to the stages


@pytest.fixture
def rollout_args(tmp_path):
    out = tmp_path / "out"
    return out, ["rollout", "--out", str(out), "--k", "2", "--sampling.max-new-tokens", "8", "--quiet"]


def _nothing_written(out):
    return not out.exists() or not any(out.iterdir())


def test_missing_column_names_file_row_and_field(capsys, tmp_path, rollout_args):
    out, argv = rollout_args
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"id": "a", "prompt": "1+2=", "answer": "3"}, {"id": "b", "prompt": "2+2="}])
    err = _bad_input(capsys, argv + ["--data", str(data)])
    assert str(data) in err and "row 1" in err and "answer" in err
    assert _nothing_written(out)


def test_empty_dataset(capsys, tmp_path, rollout_args):
    out, argv = rollout_args
    data = tmp_path / "empty.jsonl"
    data.write_text("", encoding="utf-8")
    err = _bad_input(capsys, argv + ["--data", str(data)])
    assert str(data) in err and "empty" in err
    assert _nothing_written(out)


def test_non_utf8_file(capsys, tmp_path, rollout_args):
    out, argv = rollout_args
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"id": "a", "prompt": "1+2=", "answer": "3"}\n{"id": "b", "prompt": "caf\xe9", "answer": "1"}\n')
    err = _bad_input(capsys, argv + ["--data", str(data)])
    assert str(data) in err and "row 1" in err and "UTF-8" in err
    assert _nothing_written(out)


def test_k_below_one_and_unknown_task(capsys, tmp_path, rollout_args, arithmetic_files):
    out, argv = rollout_args
    err = _bad_input(capsys, argv + ["--data", str(arithmetic_files[0]), "--k", "0"])
    assert "field 'k'" in err
    err = _bad_input(capsys, argv + ["--data", str(arithmetic_files[0]), "--task", "poetry"])
    assert "poetry" in err and "arithmetic" in err  # names the unknown task and what exists
    assert _nothing_written(out)


def test_prompt_longer_than_context_is_a_counted_skip(capsys, tmp_path, rollout_args):
    out, argv = rollout_args
    data = tmp_path / "d.jsonl"
    rows = generate_rows(3, 0, id_prefix="ok")
    rows.append({"id": "long", "prompt": "1+" * 200 + "1=", "answer": "201"})
    write_jsonl(data, rows)
    assert main(argv + ["--data", str(data)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["skipped_too_long"] == 1 and printed["n_prompts"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_ids"] == ["long"]
    assert {row["prompt_id"] for row in map(json.loads, (out / "rollouts.jsonl").read_text().splitlines())} == {
        r["id"] for r in rows[:3]}


def test_every_prompt_too_long_is_an_error(capsys, tmp_path, rollout_args):
    out, argv = rollout_args
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"id": "long", "prompt": "1+" * 200 + "1=", "answer": "201"}])
    err = _bad_input(capsys, argv + ["--data", str(data)])
    assert str(data) in err and "context" in err
    assert _nothing_written(out)


def test_unknown_model_folder(capsys, tmp_path, rollout_args, arithmetic_files):
    out, argv = rollout_args
    err = _bad_input(capsys, argv + ["--data", str(arithmetic_files[0]), "--model", str(tmp_path / "nope")])
    assert "nope" in err and "does not exist" in err
    assert _nothing_written(out)


# ------------------------------------------------------------------------------ help and the main job


@pytest.mark.parametrize("command", ["run", "rollout", "targets", "train", "evaluate", "register", "metrics",
                                     "pretrain-tiny", "prepare", "compile", "submit", "schedule", "route", "continual",
                                     "promote", "lineage"])
def test_every_command_has_help_with_an_example(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "caopd"
    result = subprocess.run([str(script), "metrics", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "caopd metrics" in result.stdout


@pytest.mark.slow  # the whole pipeline through kfp.local
def test_main_job_end_to_end_on_a_tiny_budget(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--quiet", "--n-train", "16", "--n-eval", "24", "--k", "2",
                 "--train.steps", "2", "--train.prompts-per-step", "4", "--train.save-every", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"base", "opd", "caopd"}
    for arm, metrics in summary["arms"].items():
        assert set(metrics) == set(METRIC_KEYS), arm
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["ece"] <= 1.0
        assert (out / summary["plots"][arm]).stat().st_size > 0
    predictions = [json.loads(line) for line in (out / "evaluation" / "predictions_caopd.jsonl").open()]
    assert len(predictions) == 24
    assert summary["registered"]["version"] == 1
    # The printed table reports every arm.
    table = (out / "comparison.md").read_text()
    assert all(arm in table for arm in ("base", "opd", "caopd"))
    assert not math.isnan(summary["arms"]["base"]["accuracy"])
    # It ran as the Kubeflow pipeline, through kfp.local, with the pipeline root under --out.
    [pipeline_run] = (out / "kfp").glob("caopd-*")
    assert {"data-preparation", "merge-rollout-shards", "calibration-evaluation", "model-registration"} <= {
        p.name for p in pipeline_run.iterdir()}
    log = re.sub(r"\x1b\[[0-9;]*m", "", (out / "kfp" / "pipeline.log").read_text())  # kfp.local colours it
    assert log.count("finished with status SUCCESS") >= 10
    for arm in ("opd", "caopd"):
        assert (out / f"train_{arm}" / "training_curves.png").stat().st_size > 0
        assert json.loads((out / f"train_{arm}" / "model" / "caopd.json").read_text())["method"] == arm
    # Every stage logged to the local MLflow store, and the model was registered there.
    assert summary["registered"]["tracking_uri"] == f"sqlite:///{out.resolve() / 'mlflow' / 'mlflow.db'}"
    assert Path(summary["registered"]["source"]).is_relative_to((out / "mlflow" / "artifacts").resolve())


def test_register_promote_and_lineage_on_the_local_mlflow_store(capsys, tmp_path, tiny_model):
    model_dir = tmp_path / "model"
    tiny_model.model.save_pretrained(model_dir, safe_serialization=True)
    tiny_model.tokenizer.save_pretrained(model_dir)
    summary = tmp_path / "evaluation.json"
    good = {"accuracy": 0.6, "ece": 0.1, "brier": 0.2, "auroc": 0.7, "spr": 0.6, "mean_confidence": 0.6,
            "overconfidence_gap": 0.0, "missing_rate": 0.0}
    summary.write_text(json.dumps({"arms": {"caopd": good}}))
    store = ["--mlflow-dir", str(tmp_path / "mlflow")]
    register = ["register", "--model-dir", str(model_dir), "--metrics", str(summary), "--pipeline-run-id", "p1", *store]
    assert main(register) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["version"] == 1 and first["created"] and first["decision"]["passed"]
    assert main(register) == 0  # the same pipeline run: the same version
    assert json.loads(capsys.readouterr().out)["created"] is False
    assert main(["promote", "caopd-tiny", "--to", "champion", *store]) == 0
    assert json.loads(capsys.readouterr().out)["moved"] is True
    assert main(["lineage", "caopd-tiny@champion", "--json", *store]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert chain["version"]["aliases"] == ["champion"] and chain["version"]["metrics"]["ece"] == 0.1
    assert main(["lineage", "caopd-tiny@nobody", *store]) == EXIT_BAD_INPUT
    assert "has no version with alias 'nobody'" in capsys.readouterr().err
