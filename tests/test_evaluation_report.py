"""Risk–coverage, AURC and bootstrap intervals pinned on hand-computed cases; the evaluation report carries them."""

import json
import math

import numpy as np
import pytest

from caopd.errors import CaopdInputError
from caopd.evaluation.metrics import (
    METRIC_KEYS,
    aurc,
    bootstrap_intervals,
    risk_coverage,
)
from caopd.evaluation.tables import intervals_table


def test_risk_coverage_and_aurc_by_hand():
    # most confident first: right (risk 0/1), wrong (1/2), right (1/3)
    coverage, risk = risk_coverage([0.7, 0.9, 0.8], [True, True, False])
    np.testing.assert_allclose(coverage, [1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.5, 1 / 3])
    assert aurc([0.7, 0.9, 0.8], [True, True, False]) == pytest.approx((0 + 0.5 + 1 / 3) / 3)


def test_tied_confidences_spread_their_errors_whatever_the_order():
    # one tie of two (one right, one wrong) after a sure right answer: expected errors 0, 0.5, 1 at k = 1, 2, 3
    for correct in ([True, True, False], [True, False, True]):
        _, risk = risk_coverage([0.9, 0.4, 0.4], correct)
        np.testing.assert_allclose(risk, [0.0, 0.25, 1 / 3])
    assert aurc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    assert aurc([None, 0.3], [False, True]) == pytest.approx(0.25)  # missing counts as 0.0: least confident


def test_bootstrap_intervals_on_hand_cases():
    # identical predictions: every resample is the same, so every interval is a point
    same = bootstrap_intervals([0.8] * 5, [True] * 5, n_resamples=200)
    assert same["accuracy"] == (1.0, 1.0) and same["ece"] == pytest.approx((0.2, 0.2))
    assert same["brier"] == pytest.approx((0.04, 0.04)) and math.isnan(same["auroc"][0])  # one class: no AUROC
    # two predictions, one right: resampled accuracy is 0, 1/2 or 1 with odds 1:2:1, so the central 95 % spans [0, 1]
    two = bootstrap_intervals([0.2, 0.9], [False, True], n_resamples=2000, seed=3)
    assert two["accuracy"] == (0.0, 1.0) and two["missing_rate"] == (0.0, 0.0)
    assert set(two) == {*METRIC_KEYS, "aurc"}
    # seeded: the same seed gives the same intervals
    rng = np.random.default_rng(0)
    conf, correct = rng.random(300), rng.random(300) < 0.6
    assert bootstrap_intervals(conf, correct, 100, seed=1) == bootstrap_intervals(conf, correct, 100, seed=1)
    point = float(np.mean(correct))
    low, high = bootstrap_intervals(conf, correct, 300, seed=1)["accuracy"]
    assert low < point < high and high - low < 0.15


def test_intervals_table_shows_low_and_high_per_metric():
    table = intervals_table({"caopd": {"intervals": {"ece": (0.1, 0.25)}}})
    assert "aurc" in table.splitlines()[0] and "| caopd | n/a | 0.100–0.250 |" in table


def test_evaluation_report_has_aurc_intervals_and_the_risk_coverage_plot(tmp_path, arithmetic_files):
    from caopd.config.stages import EvaluateConfig
    from caopd.stages.evaluate import run_evaluation

    _, evaluation = arithmetic_files
    cfg = EvaluateConfig(models={"base": "tiny"}, data=str(evaluation), bootstrap_resamples=50)
    summary = run_evaluation(cfg, tmp_path / "eval", progress=False)
    arm = summary["arms"]["base"]
    assert 0.0 <= arm["aurc"] <= 1.0
    assert arm["intervals"]["accuracy"][0] <= arm["accuracy"] <= arm["intervals"]["accuracy"][1]
    assert (tmp_path / "eval" / "risk_coverage.png").stat().st_size > 0
    assert "95 % bootstrap intervals" in (tmp_path / "eval" / "report.md").read_text()
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["arms"]["base"]["intervals"]


def test_extra_prompt_sets_are_scored_and_reported_beside_the_in_domain_one(tmp_path):
    from caopd.config.stages import EvaluateConfig
    from caopd.io import write_jsonl
    from caopd.stages.evaluate import run_evaluation
    from caopd.tasks.arithmetic import generate_rows

    write_jsonl(tmp_path / "eval.jsonl", generate_rows(5, 1, ["add_2x1"], id_prefix="eval"))
    write_jsonl(tmp_path / "ood.jsonl", generate_rows(4, 2, ["mul_2x2"], id_prefix="ood"))
    cfg = EvaluateConfig(models={"base": "tiny"}, data=str(tmp_path / "eval.jsonl"),
                         extra_data={"ood": str(tmp_path / "ood.jsonl")}, bootstrap_resamples=20)
    summary = run_evaluation(cfg, tmp_path / "out", progress=False)
    assert summary["arms"]["base"]["n"] == 5 and summary["sets"]["ood"]["arms"]["base"]["n"] == 4
    kinds = {json.loads(line)["kind"] for line in (tmp_path / "out" / "predictions_base_ood.jsonl").open()}
    assert kinds == {"mul_2x2"}
    assert (tmp_path / "out" / "risk_coverage_ood.png").stat().st_size > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## in-domain" in report and "## ood" in report and "accuracy (ood)" in report
    assert set(summary["sets"]["ood"]["arms"]["base"]["by_kind"]) == {"mul_2x2"}
    assert "| add_2x1 (n = 5) |" in report and "| mul_2x2 (n = 4) |" in report


def test_an_extra_set_of_another_task_is_verified_by_its_own_task(tmp_path):
    from caopd.config.stages import EvaluateConfig
    from caopd.io import write_jsonl
    from caopd.stages.evaluate import run_evaluation
    from caopd.tasks.arithmetic import generate_rows

    write_jsonl(tmp_path / "eval.jsonl", generate_rows(6, 1, ["add_1x1"], id_prefix="eval"))
    # multiple choice: the arithmetic model answers digits, never an <answer> tag, so none of it verifies
    write_jsonl(tmp_path / "mcq.jsonl", [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"{i}+1="}],
                                          "answer": "B"} for i in range(4)])
    cfg = EvaluateConfig(models={"base": "tiny"}, data=str(tmp_path / "eval.jsonl"),
                         extra_data={"chem": str(tmp_path / "mcq.jsonl")}, extra_tasks={"chem": "mcq"},
                         bootstrap_resamples=0)
    summary = run_evaluation(cfg, tmp_path / "out", progress=False)
    assert summary["sets"]["chem"]["task"] == "mcq"
    in_domain = [json.loads(line) for line in (tmp_path / "out" / "predictions_base.jsonl").open()]
    chem = [json.loads(line) for line in (tmp_path / "out" / "predictions_base_chem.jsonl").open()]
    assert len(chem) == 4 and all(row["answer"] is None and not row["correct"] for row in chem)
    assert "by_kind" not in summary["sets"]["chem"]["arms"]["base"]  # multiple choice has no kinds
    assert any(row["answer"] is not None for row in in_domain)  # the arithmetic verifier reads the same model


@pytest.mark.parametrize("bad, message", [
    ({"extra_tasks": {"chem": "mcq"}}, "extra_data does not give"),
    ({"extra_data": {"chem": "c.jsonl"}, "extra_tasks": {"chem": "poetry"}}, "unknown task"),
])
def test_bad_extra_tasks_are_refused(bad, message):
    from caopd.config.stages import EvaluateConfig

    with pytest.raises(ValueError, match=message):
        EvaluateConfig(models={"base": "tiny"}, data="e.jsonl", **bad)


def test_the_stage_reports_the_tasks_extra_accuracies_beside_accuracy(tmp_path):
    from caopd.config.stages import EvaluateConfig
    from caopd.io import write_jsonl
    from caopd.stages.evaluate import run_evaluation
    from caopd.tasks.arithmetic import generate_rows

    write_jsonl(tmp_path / "eval.jsonl", generate_rows(3, 1, ["add_1x1"], id_prefix="eval"))
    gold = "[{'Action': 'getX', 'Action_Input': '{\"a\": 1}'}]"
    write_jsonl(tmp_path / "tool.jsonl", [{"prompt": f"Tool X.\n\nBegin!\nQuestion: {i}", "golden_answer": gold,
                                           "name": "X"} for i in range(3)])
    cfg = EvaluateConfig(models={"base": "tiny"}, data=str(tmp_path / "eval.jsonl"),
                         extra_data={"tool": str(tmp_path / "tool.jsonl")}, extra_tasks={"tool": "tooluse"},
                         bootstrap_resamples=0)
    summary = run_evaluation(cfg, tmp_path / "out", progress=False)
    # the arithmetic model never calls a tool: every all-calls check fails, and the share is reported as such
    tool = summary["sets"]["tool"]["arms"]["base"]
    assert tool["accuracy_all_calls"] == 0.0 and list(tool)[:2] == ["accuracy", "accuracy_all_calls"]
    assert not [key for key in summary["arms"]["base"] if key.startswith("accuracy_")]  # arithmetic has none
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions_base_tool.jsonl").open()]
    assert [row["all_calls"] for row in rows] == [False] * 3
    assert "| base | 0.000 | 0.000 |" in (tmp_path / "out" / "report.md").read_text()


def test_prompts_are_fitted_to_the_context_as_the_thinking_switch_renders_them():
    from transformers import AutoTokenizer

    from caopd.models.loading import encode_text, resolve_model_path
    from caopd.stages.common import fit_to_context
    from caopd.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    # Qwen3's convention: thinking switched off, the template opens and closes an empty thinking block itself
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    [example] = get_task("arithmetic").examples_from_rows([{"prompt": "12+34=", "answer": "46"}])
    length = len(encode_text(tokenizer, "12+34="))
    on, _ = fit_to_context([example], tokenizer, length + 4, 4, source="p.jsonl", thinking="on")
    assert on == [example]
    with pytest.raises(CaopdInputError, match="no prompt fits"):  # 15 more characters than the context holds
        fit_to_context([example], tokenizer, length + 4, 4, source="p.jsonl", thinking="off")
