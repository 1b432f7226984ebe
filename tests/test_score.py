"""``caopd score``: completions a model already wrote, scored as the calibration evaluation scores its own —
accuracy, the task's extra accuracies, ECE, mean confidence and missing rate pinned on hand-built completions."""

import json
import subprocess
import sys

import pytest

from caopd.config.scoring import ScoreConfig
from caopd.errors import CaopdInputError
from caopd.io import file_digest, write_jsonl
from caopd.stages.score import run_scoring

X_THEN_Y = "[{'Action': 'getX', 'Action_Input': '{\"a\": 1}'}, {'Action': 'getY', 'Action_Input': '{}'}]"


def _tool_prompt(question: str) -> str:
    return ("Your task is to answer the user's question using available tools. \nYou have access to the following "
            "tools:\nName: Demo\nDescription: a demo API\nDocumentation:\ngetX: takes a\n\nUse the following "
            f"format:\nThought: ...\nAction: ...\nAction Input: ...\n\nBegin!\nQuestion: {question}")


# (gold calls, completion, correct: first call matches, all_calls: the calls as a multiset match, stated confidence)
TOOL_CASES = [
    # a thinking block mentions a confidence; the statement after it, lower case, is the one that counts
    (X_THEN_Y, "<think>I need getX, then getY. Confidence: 0.1 at first glance.</think>\nThought: two calls\n"
               "Action: getX\nAction Input: {\"a\": 1}\nAction: getY\nAction Input: {}\nconfidence: 0.7",
     True, True, 0.7),
    # reordered, indented JSON; the confidence as a tag
    ("[{'Action': 'getX', 'Action_Input': '{\"a\": 1, \"b\": \"x\"}'}]",
     "Action: getX\nAction Input: {\n  \"b\": \"x\",\n  \"a\": 1\n}\n<confidence>0.8</confidence>", True, True, 0.8),
    # the first call only: the official accuracy holds, all calls does not; a percentage
    (X_THEN_Y, "Action: getX\nAction Input: {\"a\": 1}\nConfidence: 90%", True, False, 0.9),
    # malformed JSON: no call at all
    ("[{'Action': 'getZ', 'Action_Input': '{\"q\": \"tea\"}'}]",
     "Action: getZ\nAction Input: {\"q\": \"tea\"\nConfidence: 0.3", False, False, 0.3),
    # both calls in the other order, and no confidence: the first call is wrong, the multiset right; missing -> 0.0
    (X_THEN_Y, "Action: getY\nAction Input: {}\nAction: getX\nAction Input: {\"a\": 1}\n", False, True, None),
    # the wrong API
    ("[{'Action': 'getW', 'Action_Input': '{}'}]", "Action: getV\nAction Input: {}\nConfidence: 0.65",
     False, False, 0.65),
    # the right call and one too many
    ("[{'Action': 'getA', 'Action_Input': '{}'}]",
     "Action: getA\nAction Input: {}\nAction: getB\nAction Input: {}\nConfidence: 1", True, False, 1.0),
]

# (gold letter, completion, correct, stated confidence)
MCQ_CASES = [
    ("A", "<think>B looks plausible. Confidence: 0.2</think>\n<reasoning>A fits.</reasoning>\n<answer>A</answer>\n"
          "confidence: 0.6", True, 0.6),
    ("B", "<answer>C</answer>\nConfidence: 40%", False, 0.4),
    ("B", "<answer> b </answer>\n<confidence>0.9</confidence>", True, 0.9),
    ("D", "I am not sure.", False, None),
]


def _tool_files(tmp_path, cases=TOOL_CASES):
    # no id column: the prompts' ids are their positions, which the completions give as numbers
    prompts = [{"prompt": _tool_prompt(f"question {i}"), "golden_answer": gold, "name": "Demo"}
               for i, (gold, *_) in enumerate(cases)]
    completions = [{"id": i, "completion": completion} for i, (_, completion, *_) in enumerate(cases)]
    write_jsonl(tmp_path / "tool.jsonl", prompts)
    write_jsonl(tmp_path / "tool_completions.jsonl", completions)
    return tmp_path / "tool.jsonl", tmp_path / "tool_completions.jsonl"


def _mcq_files(tmp_path):
    prompts = [{"id": f"q{i}", "answer": gold,
                "prompt": [{"role": "system", "content": "Answer with <answer>X</answer>."},
                           {"role": "user", "content": f"Question {i}? A) 1 B) 2 C) 3 D) 4"}]}
               for i, (gold, *_) in enumerate(MCQ_CASES)]
    # in another order than the prompts: rows are matched by id, not position
    completions = [{"id": f"q{i}", "completion": completion, "model": "served-1"}
                   for i, (_, completion, *_) in reversed(list(enumerate(MCQ_CASES)))]
    write_jsonl(tmp_path / "mcq.jsonl", prompts)
    write_jsonl(tmp_path / "mcq_completions.jsonl", completions)
    return tmp_path / "mcq.jsonl", tmp_path / "mcq_completions.jsonl"


def _predictions(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tool_use_completions_are_scored_by_first_call_and_by_all_calls(tmp_path):
    data, completions = _tool_files(tmp_path)
    cfg = ScoreConfig(task="tooluse", data=str(data), completions=str(completions), arm="served",
                      bootstrap_resamples=0)
    summary = run_scoring(cfg, tmp_path / "out")
    arm = summary["arms"]["served"]
    rows = _predictions(tmp_path / "out" / "predictions_served.jsonl")
    assert [(r["prompt_id"], r["correct"], r["all_calls"], r["confidence"]) for r in rows] == [
        (str(i), correct, all_calls, confidence) for i, (_, _, correct, all_calls, confidence) in enumerate(TOOL_CASES)]
    assert arm["n"] == 7
    assert arm["accuracy"] == pytest.approx(4 / 7)
    assert arm["accuracy_all_calls"] == pytest.approx(3 / 7)
    assert arm["mean_confidence"] == pytest.approx((0.7 + 0.8 + 0.9 + 0.3 + 0.0 + 0.65 + 1.0) / 7)
    assert arm["missing_rate"] == pytest.approx(1 / 7)
    # 10 bins, an edge opening its bin: 0.0 (wrong) in bin 0, 0.3 (wrong) in 3, 0.65 (wrong) in 6, 0.7 (right) in 7
    # (not in 6 with 0.65), 0.8 (right) in 8, 0.9 and 1.0 (both right, mean 0.95) in 9
    ece = (abs(0 - 0.0) + abs(0 - 0.3) + abs(0 - 0.65) + abs(1 - 0.7) + abs(1 - 0.8) + 2 * abs(1 - 0.95)) / 7
    assert arm["ece"] == pytest.approx(ece)
    assert list(arm)[:2] == ["accuracy", "accuracy_all_calls"]  # the extra accuracy beside the official one


def test_multiple_choice_completions_are_scored_and_have_no_extra_accuracies(tmp_path):
    data, completions = _mcq_files(tmp_path)
    cfg = ScoreConfig(task="mcq", data=str(data), completions=str(completions), bootstrap_resamples=0)
    arm = run_scoring(cfg, tmp_path / "out")["arms"]["completions"]
    rows = _predictions(tmp_path / "out" / "predictions_completions.jsonl")
    assert [(r["prompt_id"], r["correct"], r["confidence"]) for r in rows] == [
        (f"q{i}", correct, confidence) for i, (_, _, correct, confidence) in enumerate(MCQ_CASES)]
    assert arm["accuracy"] == 0.5 and arm["missing_rate"] == 0.25
    assert arm["mean_confidence"] == pytest.approx((0.6 + 0.4 + 0.9 + 0.0) / 4)
    # bins: 0.0 (wrong) in 0, 0.4 (wrong) in 4, 0.6 (right) in 6, 0.9 (right) in 9
    assert arm["ece"] == pytest.approx((0.0 + 0.4 + 0.4 + 0.1) / 4)
    assert not [key for key in arm if key.startswith("accuracy_")]
    assert not set(rows[0]) - {"prompt_id", "sample", "completion", "answer", "correct", "confidence", "finished",
                               "kind"}


def test_scoring_writes_what_the_evaluation_stage_writes(tmp_path):
    data, completions = _tool_files(tmp_path)
    out = tmp_path / "out"
    cfg = ScoreConfig(task="tooluse", data=str(data), completions=str(completions), bootstrap_resamples=30)
    summary = run_scoring(cfg, out)
    for name in ("predictions_completions.jsonl", "reliability_completions.png", "confidence_completions.png",
                 "risk_coverage.png", "report.md", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["stage"] == "score"
    assert summary["completions_digest"] == file_digest(completions)
    assert summary["data_digest"] == file_digest(data)
    arm = summary["arms"]["completions"]
    low, high = arm["intervals"]["accuracy"]
    assert low <= arm["accuracy"] <= high
    report = (out / "report.md").read_text()
    assert "| completions |" in report and "accuracy_all_calls" in report and "95 % bootstrap intervals" in report
    assert "0.429" in report  # accuracy_all_calls = 3/7 in the report's table of the task's other accuracies


def _write(path, rows):
    write_jsonl(path, rows)
    return path


@pytest.mark.parametrize("rows, row, field", [
    ([{"id": "q0", "completion": "x"}, {"id": "q9", "completion": "x"}], 1, "id"),  # no such prompt
    ([{"id": "q0", "completion": "x"}, {"id": "q1", "completion": "x"}, {"id": "q0", "completion": "y"}], 2, "id"),
    ([{"id": "q0", "completion": "x"}, {"id": "q1"}], 1, "completion"),  # no text
    ([{"id": "q0", "completion": "x"}, {"id": "q1", "completion": None}], 1, "completion"),
    ([{"completion": "x"}], 0, "id"),  # no id: a completion must say which prompt it answers
], ids=["unknown id", "duplicate id", "no completion field", "null completion", "no id"])
def test_bad_completion_rows_are_named_by_file_row_and_field(tmp_path, rows, row, field):
    data, _ = _mcq_files(tmp_path)
    completions = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CaopdInputError) as caught:
        run_scoring(ScoreConfig(task="mcq", data=str(data), completions=str(completions)), tmp_path / "out")
    assert (caught.value.file, caught.value.row, caught.value.field) == (str(completions), row, field)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_prompt_without_a_completion_is_named_by_its_row_in_the_prompts(tmp_path):
    data, _ = _mcq_files(tmp_path)
    completions = _write(tmp_path / "partial.jsonl", [{"id": "q0", "completion": "x"}, {"id": "q3", "completion": "y"}])
    with pytest.raises(CaopdInputError) as caught:
        run_scoring(ScoreConfig(task="mcq", data=str(data), completions=str(completions)), tmp_path / "out")
    assert (caught.value.file, caught.value.row, caught.value.field) == (str(data), 1, "id")
    assert "'q1'" in str(caught.value) and str(completions) in str(caught.value) and "1 more" in str(caught.value)


@pytest.mark.parametrize("bad", [{"arm": "a/b"}, {"task": "poetry"}, {"bootstrap_resamples": -1}, {"models": {}}])
def test_bad_score_configs_are_refused(bad):
    with pytest.raises(ValueError):
        ScoreConfig(data="d.jsonl", completions="c.jsonl", **bad)


def test_scoring_loads_no_model_code():
    # a user scoring logged completions waits for no torch import
    code = "import sys, caopd.stages.score; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_every_score_setting_is_described():
    assert all(field.description for field in ScoreConfig.model_fields.values())


def test_scoring_the_evaluation_stages_own_completions_gives_its_metrics(tmp_path, arithmetic_files):
    from caopd.config.stages import EvaluateConfig
    from caopd.io import read_jsonl
    from caopd.stages.evaluate import run_evaluation

    _, evaluation = arithmetic_files
    evaluated = run_evaluation(EvaluateConfig(models={"base": "tiny"}, data=str(evaluation), bootstrap_resamples=20),
                               tmp_path / "eval", progress=False)["arms"]["base"]
    logged = [{"id": row["prompt_id"], "completion": row["completion"], "finished": row["finished"]}
              for row in read_jsonl(tmp_path / "eval" / "predictions_base.jsonl")]
    completions = _write(tmp_path / "logged.jsonl", logged)
    scored = run_scoring(ScoreConfig(data=str(evaluation), completions=str(completions), arm="base",
                                     bootstrap_resamples=20), tmp_path / "score")["arms"]["base"]
    assert {k: v for k, v in scored.items() if k != "completions"} == {
        k: v for k, v in evaluated.items() if k not in ("model", "skipped_too_long")}
    assert read_jsonl(tmp_path / "score" / "predictions_base.jsonl") == read_jsonl(
        tmp_path / "eval" / "predictions_base.jsonl")
