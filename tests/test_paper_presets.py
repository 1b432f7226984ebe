"""The paper's setup end to end: ``caopd run --preset paper-tooluse`` on converted ToolAlpaca rows and
``--preset paper-science`` on chemistry rows, with the Qwen3-convention stand-in model, through kfp.local — lengths and
steps cut for time, every other value the preset's. Each stage's summary shows the settings it ran with."""

import json
from pathlib import Path

import pytest

from caopd.cli import main
from caopd.io import read_json, write_jsonl
from caopd.tasks.toolalpaca import convert_toolalpaca

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
CUT = ["--k", "2", "--rollout.max-new-tokens", "40", "--train.sampling.max-new-tokens", "40",
       "--evaluation.max-new-tokens", "40", "--train.steps", "2", "--train.prompts-per-step", "2",
       "--train.max-prompt-tokens", "320", "--train-baseline", "false"]


def stage_summary(out: Path, stage: str, folder: str) -> dict:
    [path] = sorted(out.glob(f"kfp/**/{stage}/{folder}/summary.json"))
    return read_json(path)


def run_preset(out: Path, preset: str, train: Path, evaluation: Path) -> dict:
    code = main(["run", "--quiet", "--out", str(out), "--preset", preset, "--model", "standin",
                 "--train-source", str(train), "--eval-source", str(evaluation), *CUT])
    assert code == 0
    return read_json(out / "summary.json")


def check_stages(out: Path, task: str, eval_tokens_preset_would_set: int) -> None:
    rollout = stage_summary(out, "rollout-estimation", "rollouts")["config"]
    assert (rollout["task"], rollout["k"]) == (task, 2)
    assert (rollout["sampling"]["temperature"], rollout["sampling"]["top_p"],
            rollout["sampling"]["max_new_tokens"]) == (1.0, 1.0, 40)
    train = stage_summary(out, "opd-training", "model")
    cfg = train["config"]["train"]
    assert (cfg["lr"], cfg["lr_schedule"], cfg["warmup_ratio"], cfg["teacher"], cfg["ema_rate"]) == (
        2e-5, "cosine", 0.1, "ema", 0.01)
    assert (cfg["loss_normalization"], cfg["skip_first_tokens"], cfg["max_prompt_tokens"]) == ("sequence", 3, 320)
    assert (cfg["steps"], cfg["epochs"], cfg["prompts_per_step"], cfg["k"]) == (2, None, 2, 2)
    assert cfg["sampling"]["max_new_tokens"] == 40
    evaluation = stage_summary(out, "calibration-evaluation", "evaluation")
    sampling = evaluation["config"]["sampling"]
    assert (sampling["temperature"], sampling["max_new_tokens"]) == (0.0, 40)  # greedy, as the preset says
    assert eval_tokens_preset_would_set in (1024, 2048)
    for arm in ("base", "caopd"):
        metrics = evaluation["arms"][arm]
        for key in ("accuracy", "ece", "mean_confidence", "missing_rate"):
            assert 0.0 <= metrics[key] <= 1.0, (arm, key)
    assert (out / "evaluation" / "reliability_caopd.png").is_file()


def test_paper_tooluse_preset_on_converted_toolalpaca_rows(tmp_path):
    rows = convert_toolalpaca(ROOT / "data" / "toolalpaca" / "eval_real.json")
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(train, rows[0:60:10])  # six APIs' first instructions
    write_jsonl(evaluation, rows[5:65:15])
    summary = run_preset(tmp_path / "run", "paper-tooluse", train, evaluation)
    check_stages(tmp_path / "run", "tooluse", 1024)
    evaluation_summary = stage_summary(tmp_path / "run", "calibration-evaluation", "evaluation")
    assert "accuracy_all_calls" in evaluation_summary["arms"]["caopd"]
    train_log = [json.loads(line) for line in
                 next((tmp_path / "run").glob("kfp/**/opd-training/model/train_log.jsonl")).read_text().splitlines()]
    assert sum(step["truncated_prompts"] for step in train_log) > 0  # ToolAlpaca prompts exceed 320 tokens
    assert summary["config"]["preset"] == "paper-tooluse"


def test_paper_science_preset_on_chemistry_rows(tmp_path):
    summary = run_preset(tmp_path / "run", "paper-science", FIXTURES / "tasks" / "science_train_rows.jsonl",
                         FIXTURES / "sciknoweval_chemistry_rows.jsonl")
    check_stages(tmp_path / "run", "mcq", 2048)
    targets = stage_summary(tmp_path / "run", "target-replacement", "records")
    assert targets["n_records"] == 3 * 2
    assert summary["config"]["preset"] == "paper-science"
