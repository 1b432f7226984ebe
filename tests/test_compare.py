"""caopd compare: every baseline from one base and one set of rollouts; the table and the paper's checks."""

import json

import pytest

from caopd.cli import main
from caopd.config.experiments import ARMS, CompareConfig
from caopd.experiments.compare import acceptance_checks, paper_table


def _arm(accuracy, ece, intervals=None):
    return {"accuracy": accuracy, "ece": ece, "brier": 0.2, "auroc": 0.7, "spr": 0.5, "overconfidence_gap": 0.1,
            "intervals": intervals or {}}


def test_acceptance_checks_by_hand():
    results = {
        "in_domain": {"base": _arm(0.50, 0.10), "opd_demo": _arm(0.60, 0.40), "opd_solution": _arm(0.62, 0.30),
                      "caopd_demo": _arm(0.60, 0.20), "caopd_solution": _arm(0.58, 0.35), "rlcr": _arm(0.4, 0.05)},
        "ood": {"base": _arm(0.3, 0.1), "opd_demo": _arm(0.5, 0.25), "opd_solution": _arm(0.5, 0.30),
                "caopd_demo": _arm(0.5, 0.26), "caopd_solution": _arm(0.5, 0.10), "rlcr": _arm(0.1, 0.01)},
    }
    checks = acceptance_checks(results)
    # the base and RLCR are neither OPD nor CaOPD arms: their low ECE decides nothing
    assert set(checks) == {"caopd_demo", "caopd_solution"}
    assert checks["caopd_demo"]["ece_below_every_opd_arm"] == {"in_domain": True, "ood": False}  # 0.26 > 0.25
    assert checks["caopd_solution"]["ece_below_every_opd_arm"] == {"in_domain": False, "ood": True}  # 0.35 > 0.30
    assert checks["caopd_demo"]["accuracy_minus_best_opd"] == pytest.approx(-0.02)
    assert checks["caopd_demo"]["accuracy_within"] is True
    assert checks["caopd_solution"]["accuracy_minus_best_opd"] == pytest.approx(-0.04)
    assert checks["caopd_solution"]["accuracy_within"] is False
    assert acceptance_checks({"in_domain": {"base": _arm(0.5, 0.1), "caopd_demo": _arm(0.5, 0.1)}}) == {}


def test_paper_table_shows_each_metric_with_its_interval():
    table = paper_table({"base": _arm(0.5, 0.1234, {"ece": (0.1, 0.15)}), "opd_demo": _arm(0.6, 0.4)})
    rows = table.splitlines()
    assert rows[0].startswith("| arm | method | accuracy | ece |")
    assert "| base | base model, untrained | 0.500 | 0.123 (0.100–0.150) |" in rows[2]
    assert ARMS["opd_demo"][2] in rows[3] and "| 0.400 |" in rows[3]


@pytest.mark.slow
def test_compare_trains_every_arm_from_one_set_of_rollouts(tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["compare", "--out", str(out), "--quiet", "--n-train", "6", "--n-eval", "8", "--k", "2",
                 "--train.steps", "1", "--train.prompts-per-step", "2", "--bootstrap-resamples", "20",
                 "--ood-kinds", "mul_1x1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sets"]) == {"in_domain", "ood"}
    for arms in summary["sets"].values():
        assert list(arms) == ["base", *ARMS]
        assert all(set(m["intervals"]) >= {"accuracy", "ece"} for m in arms.values())
    for arm, (method, context, _) in ARMS.items():
        trained = json.loads((out / f"train_{arm}" / "summary.json").read_text())["config"]
        assert trained["model"] == "tiny" and trained["train"]["method"] == method
        if method != "rlcr":
            assert trained["train"]["teacher_context"] == context
            assert trained["records"].endswith(f"targets_{method}_{context}/records.jsonl")
    # one rollout estimation serves every arm; no held-out kind reached training
    assert [p.name for p in out.glob("rollouts*")] == ["rollouts"]
    assert "mul_1x1" not in {json.loads(line)["kind"] for line in (out / "data" / "train.jsonl").open()}
    assert set(summary["checks"]) == {"caopd_demo", "caopd_solution"}
    report = (out / "report.md").read_text()
    assert "## Out of distribution (mul_1x1)" in report and "ECE below every OPD arm (ood)" in report
    # each set broken down by kind: the held-out kind only in the OOD set, the trained ones only in-domain
    assert set(summary["sets"]["ood"]["caopd_demo"]["by_kind"]) == {"mul_1x1"}
    in_domain_kinds = {json.loads(line)["kind"] for line in (out / "data" / "eval.jsonl").open()}
    assert set(summary["sets"]["in_domain"]["caopd_demo"]["by_kind"]) == in_domain_kinds
    assert report.count("Accuracy / mean stated confidence by kind") == 2 and "| mul_1x1 (n = 8) |" in report
    assert (out / "compare.png").stat().st_size > 0
    assert "in_domain:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--arms", "sft"], "arms"),
    (["--ood-kinds", "div_1x1"], "unknown arithmetic kinds"),
    (["--train.lr", "0"], "train.lr"),
])
def test_bad_compare_settings_exit_2_before_any_work(tmp_path, capsys, argv, message):
    assert main(["compare", "--out", str(tmp_path / "c"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_compare_config_keeps_the_table_order():
    assert CompareConfig(arms=["rlcr", "opd_demo", "rlcr"]).arms == ["opd_demo", "rlcr"]
