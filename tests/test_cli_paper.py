"""The paper-setup commands from the shell's side: ``caopd convert toolalpaca`` and ``caopd score`` exit codes and
messages, as a CI job or a user sees them."""

import json
from pathlib import Path

from caopd.cli import main
from caopd.io import read_json, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "data" / "toolalpaca" / "eval_real.json"


def test_convert_writes_one_row_per_instruction_of_the_real_release(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert main(["convert", "toolalpaca", str(RELEASE), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 114 and json.loads(capsys.readouterr().out)["apis"] == 11
    assert {"prompt", "golden_answer", "name", "golden_response"} <= set(rows[0])
    assert "confidence" not in rows[0]["prompt"].lower()  # the task adds the instruction, not the converter


def test_convert_refuses_a_bad_release_naming_file_record_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    records = json.loads(RELEASE.read_text())[:2]
    records[1]["Instructions"] = "not a list ["
    bad.write_text(json.dumps(records))
    assert main(["convert", "toolalpaca", str(bad), "--out", str(tmp_path / "rows.jsonl")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Instructions" in err and "1" in err
    assert not (tmp_path / "rows.jsonl").exists()  # nothing half-written


def _score_files(tmp_path, completions):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": "q1", "prompt": "Pick one.\n\nA: x\nB: y", "answer": "A"},
                          {"id": "q2", "prompt": "Pick one.\n\nA: x\nB: y", "answer": "B"}])
    given = tmp_path / "completions.jsonl"
    write_jsonl(given, completions)
    return ["score", "--task", "mcq", "--data", str(prompts), "--completions", str(given), "--out",
            str(tmp_path / "out")]


def test_score_writes_the_evaluation_outputs(tmp_path):
    args = _score_files(tmp_path, [{"id": "q1", "completion": "<answer>A</answer>\nconfidence: 0.8"},
                                   {"id": "q2", "completion": "<think>hmm</think><answer>A</answer>"}])
    assert main(args) == 0
    arm = read_json(tmp_path / "out" / "summary.json")["arms"]["completions"]
    assert (arm["accuracy"], arm["mean_confidence"], arm["missing_rate"]) == (0.5, 0.4, 0.5)


def test_score_exits_2_naming_file_row_and_field(tmp_path, capsys):
    cases = [
        ([{"id": "q1", "completion": "A"}, {"id": "q9", "completion": "B"}], "q9"),  # unknown id
        ([{"id": "q1", "completion": "A"}, {"id": "q1", "completion": "B"}], "q1"),  # duplicate id
        ([{"id": "q1", "completion": "A"}], "q2"),  # a prompt without a completion
    ]
    for i, (completions, named) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        assert main(_score_files(folder, completions)) == 2
        err = capsys.readouterr().err
        assert named in err and "row" in err and "id" in err, err
        assert not (folder / "out" / "summary.json").exists()


def test_build_standin_writes_a_loadable_instruct_model(tmp_path, capsys):
    from caopd.models.loading import load_model
    from caopd.models.standin import CHAT_TEMPLATE

    out = tmp_path / "standin"
    assert main(["build-standin", "--quiet", "--out", str(out), "--steps", "2", "--warmup-steps", "1",
                 "--batch-size", "2", "--bpe-sample", "200"]) == 0
    assert json.loads(capsys.readouterr().out)["out_dir"] == str(out)
    loaded = load_model(str(out))
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE and loaded.template == "paper"
    rendered = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
