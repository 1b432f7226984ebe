"""The bad-input matrix: every case runs the real CLI and gets its documented behaviour — one line on stderr naming
the file, row and field with exit code 2 and no output left behind, or a counted and reported skip.

Cases are (id, how to build the command in a tmp folder, what the error must name). Completions with odd
confidences are not errors: the protocol's rule reads them, and what it cannot read counts as missing.
"""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from caopd.cli import main
from caopd.evaluation.metrics import calibration_metrics
from caopd.io import write_jsonl, write_parquet
from caopd.method.protocol import parse_confidence
from caopd.models import tiny
from caopd.models.loading import load_model
from caopd.rollout.base import Completion
from caopd.stages.common import score_completions
from caopd.tasks import get_task
from caopd.tasks.arithmetic import generate_rows
from caopd.tasks.datasets import DATA_ROOT_ENV

GOOD = generate_rows(3, 0, ["add_1x1"], id_prefix="ok")


def _jsonl(path: Path, rows) -> str:
    write_jsonl(path, rows)
    return str(path)


def _raw(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _prepare_with(train_builder):
    """`caopd prepare` with a bad training set and a good eval set."""
    def build(tmp: Path) -> list[str]:
        return ["prepare", "--out", str(tmp / "out"), "--train-source", train_builder(tmp),
                "--eval-source", _jsonl(tmp / "eval.jsonl", GOOD)]
    return build


def _mcq_prepare_with(row):
    def build(tmp: Path) -> list[str]:
        good = {"prompt": [{"role": "user", "content": "Pick one: A or B"}], "answer": "A"}
        return ["prepare", "--task", "mcq", "--out", str(tmp / "out"),
                "--train-source", _jsonl(tmp / "train.jsonl", [good, row]),
                "--eval-source", _jsonl(tmp / "eval.jsonl", [good])]
    return build


def _metrics_with(rows):
    def build(tmp: Path) -> list[str]:
        return ["metrics", _jsonl(tmp / "predictions.jsonl", rows)]
    return build


def _rollout_with(*flags):
    def build(tmp: Path) -> list[str]:
        return ["rollout", "--data", _jsonl(tmp / "train.jsonl", GOOD), "--out", str(tmp / "out"), *flags]
    return build


def _records(tmp: Path, drop: str | None = None) -> str:
    rows = []
    for row in GOOD:
        record = {"prompt_id": row["id"], "prompt": row["prompt"], "answer": row["answer"],
                  "demonstration": f"{row['answer']}\nConfidence: 1.00", "p": 0.5}
        record.pop(drop, None)
        rows.append(record)
    return _jsonl(tmp / "records.jsonl", rows)


def _train_with(*flags, drop: str | None = None):
    def build(tmp: Path) -> list[str]:
        return ["train", "--records", _records(tmp, drop), "--out", str(tmp / "out"), "--quiet", "--train.steps", "1",
                *flags]
    return build


def _checkpoint_missing_config(tmp: Path) -> str:
    folder = tmp / "ckpt"
    shutil.copytree(tiny.CHECKPOINT_DIR, folder)
    (folder / "config.json").unlink()
    return str(folder)


def _checkpoint_pickle_only(tmp: Path) -> str:
    folder = tmp / "pickled"
    folder.mkdir()
    shutil.copy(tiny.CHECKPOINT_DIR / "config.json", folder / "config.json")
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    return str(folder)


def _teacher_with_other_tokenizer(tmp: Path) -> str:
    folder = tmp / "other"
    loaded = load_model("tiny")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["~"] = len(vocab["model"]["vocab"])
    (folder / "tokenizer.json").write_text(json.dumps(vocab))
    return str(folder)


def _checkpoint_with_code(tmp: Path) -> str:
    folder = tmp / "custom"
    shutil.copytree(tiny.CHECKPOINT_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                 "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_custom.py", "modeling_custom.py"):  # would leave a mark if it ever ran
        (folder / name).write_text(f"open({str(tmp / 'ran')!r}, 'w').close()\n")
    return str(folder)


def _with_model(make):
    def build(tmp: Path) -> list[str]:
        return ["rollout", "--model", make(tmp), "--data", _jsonl(tmp / "train.jsonl", GOOD), "--out", str(tmp / "out")]
    return build


def _config_file(text: str):
    def build(tmp: Path) -> list[str]:
        (tmp / "config.json").write_text(text)
        return ["rollout", "--config", str(tmp / "config.json"), "--data", _jsonl(tmp / "train.jsonl", GOOD),
                "--out", str(tmp / "out")]
    return build


def _outside_root(tmp: Path) -> str:
    (tmp / "root").mkdir()
    return _jsonl(tmp / "train.jsonl", GOOD)  # beside the root, not in it


def _dataset_dict(tmp: Path) -> str:
    (tmp / "dd").mkdir()
    (tmp / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    return str(tmp / "dd")


def _empty_parquet(tmp: Path) -> str:
    write_parquet(tmp / "empty.parquet", [], schema=pa.schema([("prompt", pa.string()), ("answer", pa.string())]))
    return str(tmp / "empty.parquet")


ERROR_CASES = [
    # --- datasets ---------------------------------------------------------------------------------------------
    ("missing prompt column", _prepare_with(lambda t: _jsonl(t / "train.jsonl", [GOOD[0], {"answer": "3"}])),
     ["train.jsonl", "row 1", "field 'prompt'", "missing required column"]),
    ("missing answer column", _prepare_with(lambda t: _jsonl(t / "train.jsonl", [{"prompt": "1+1="}])),
     ["row 0", "field 'answer'"]),
    ("null prompt", _prepare_with(lambda t: _jsonl(t / "train.jsonl", [{"prompt": None, "answer": "2"}])),
     ["row 0", "field 'prompt'"]),
    ("prompt is a number", _prepare_with(lambda t: _jsonl(t / "train.jsonl", [{"prompt": 12, "answer": "2"}])),
     ["row 0", "field 'prompt'", "expected a string, got int"]),
    ("blank prompt", _prepare_with(lambda t: _jsonl(t / "train.jsonl", [GOOD[0], {"prompt": "  ", "answer": "2"}])),
     ["row 1", "field 'prompt'", "is empty"]),
    ("answer not an integer", _prepare_with(lambda t: _jsonl(t / "train.jsonl", [{"prompt": "1+1=", "answer": "two"}])),
     ["row 0", "field 'answer'", "expected an integer"]),
    ("answer is a list", _prepare_with(lambda t: _jsonl(t / "train.jsonl", [{"prompt": "1+1=", "answer": [2]}])),
     ["row 0", "field 'answer'"]),
    ("empty file", _prepare_with(lambda t: _raw(t / "train.jsonl", b"")), ["train.jsonl", "dataset is empty"]),
    ("only blank lines", _prepare_with(lambda t: _raw(t / "train.jsonl", b"\n  \n\n")), ["dataset is empty"]),
    ("parquet with no rows", _prepare_with(_empty_parquet), ["empty.parquet", "dataset is empty"]),
    ("duplicate prompt ids", _prepare_with(lambda t: _jsonl(t / "train.jsonl", [GOOD[0], GOOD[1], GOOD[0]])),
     ["row 2", "field 'id'", "duplicate id", "first seen in row 0"]),
    ("non-UTF-8 bytes", _prepare_with(lambda t: _raw(t / "train.jsonl", b'{"prompt": "1+1=", "answer": "2"}\n'
                                                     b'{"prompt": "\xff\xfe", "answer": "2"}\n')),
     ["row 1", "line 2", "not UTF-8"]),
    ("invalid JSON", _prepare_with(lambda t: _raw(t / "train.jsonl", b'{"prompt": "1+1=", "answer": "2"\n')),
     ["row 0", "line 1", "invalid JSON"]),
    ("a line that is not an object", _prepare_with(lambda t: _raw(t / "train.jsonl", b'["1+1=", "2"]\n')),
     ["row 0", "expected a JSON object"]),
    ("unknown format", _prepare_with(lambda t: _raw(t / "train.csv", b"prompt,answer\n1+1=,2\n")),
     ["train.csv", "unknown dataset format"]),
    ("file does not exist", _prepare_with(lambda t: str(t / "nowhere.jsonl")), ["nowhere.jsonl", "does not exist"]),
    ("a DatasetDict, not a split", _prepare_with(_dataset_dict), ["DatasetDict", "train, test"]),
    ("path outside the data root", _prepare_with(_outside_root), ["field 'train_source'", "outside the data root"]),
    ("mcq answer of two letters", _mcq_prepare_with({"prompt": [{"role": "user", "content": "?"}], "answer": "AB"}),
     ["row 1", "field 'answer'", "single letter"]),
    ("mcq prompt that is neither text nor chat messages", _mcq_prepare_with({"prompt": 3, "answer": "A"}),
     ["row 1", "field 'prompt'", "chat messages"]),
    ("mcq prompt without a user message", _mcq_prepare_with({"prompt": [{"role": "system", "content": "x"}],
                                                             "answer": "A"}),
     ["row 1", "field 'prompt'", "no user message"]),
    # --- training records ---------------------------------------------------------------------------------------
    ("records without P", _train_with(drop="p"), ["records.jsonl", "row 0", "field 'p'"]),
    ("records without a prompt", _train_with(drop="prompt"), ["records.jsonl", "row 0", "field 'prompt'"]),
    # --- prediction files ---------------------------------------------------------------------------------------
    ("confidence as a string", _metrics_with([{"confidence": 0.5, "correct": True},
                                              {"confidence": "0.7", "correct": False}]),
     ["predictions.jsonl", "row 1", "field 'confidence'"]),
    ("confidence above 1", _metrics_with([{"confidence": 1.5, "correct": True}]), ["row 0", "field 'confidence'"]),
    ("confidence is true", _metrics_with([{"confidence": True, "correct": True}]), ["row 0", "field 'confidence'"]),
    ("correct missing", _metrics_with([{"confidence": 0.5}]), ["row 0", "field 'correct'"]),
    ("correct is a word", _metrics_with([{"confidence": 0.5, "correct": "yes"}]), ["row 0", "field 'correct'"]),
    ("no predictions", _metrics_with([]), ["predictions.jsonl", "no predictions"]),
    # --- configs ------------------------------------------------------------------------------------------------
    ("K below 1", _rollout_with("--k", "0"), ["field 'k'"]),
    ("lr of zero", _train_with("--train.lr", "0"), ["field 'train.lr'"]),
    ("beta above 1", _train_with("--train.beta", "1.5"), ["field 'train.beta'"]),
    ("zero steps", _train_with("--train.steps", "0"), ["field 'train.steps'"]),
    ("top-k of zero", _train_with("--train.top-k", "0"), ["field 'train.top_k'"]),
    ("negative temperature", _rollout_with("--sampling.temperature", "-1"), ["field 'sampling.temperature'"]),
    ("shard index past the shards", _rollout_with("--shard-index", "2", "--num-shards", "2"), ["num_shards"]),
    ("a separate teacher without a model", _train_with("--train.teacher", "separate"), ["teacher_model"]),
    ("unknown key in a config file", _config_file('{"k": 2, "kk": 3}'), ["field 'kk'", "Extra inputs"]),
    ("a config file that is not JSON", _config_file("k: 2"), ["config.json", "cannot read config"]),
    # --- checkpoints --------------------------------------------------------------------------------------------
    ("checkpoint without config.json", _with_model(_checkpoint_missing_config), ["ckpt", "field 'config.json'"]),
    ("pickle-only checkpoint", _with_model(_checkpoint_pickle_only), ["pickled", "pickle weights are not loaded"]),
    ("checkpoint that ships code", _with_model(_checkpoint_with_code),
     ["custom", "field 'auto_map'", "ships Python code", "CAOPD_TRUST_REMOTE_CODE=1"]),
    ("checkpoint folder that does not exist", _with_model(lambda t: str(t / "no-such-ckpt")),
     ["no-such-ckpt", "does not exist"]),
    ("teacher with another tokenizer",
     lambda t: _train_with("--train.teacher", "separate", "--train.teacher-model", _teacher_with_other_tokenizer(t))(t),
     ["other", "field 'tokenizer'", "differs from the student's"]),
]


@pytest.mark.parametrize("build, expected", [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES])
def test_bad_input_is_one_clear_line_with_exit_code_2_and_no_output(tmp_path, monkeypatch, capsys, build, expected):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    argv = build(tmp_path)
    if (tmp_path / "root").exists():  # the case confines datasets to a root, as a platform would
        monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "root"))
    capsys.readouterr()  # what building the case printed is not the command's
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("caopd: error: ") and captured.err.count("\n") == 1, captured.err
    for fragment in expected:
        assert fragment in captured.err, (fragment, captured.err)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.rglob("*"))
    assert not (tmp_path / "ran").exists()  # no code from a checkpoint ran


def test_the_matrix_has_at_least_thirty_cases():
    assert len(ERROR_CASES) + len(COMPLETION_CASES) + 1 >= 30  # + the counted skip below


def test_prompts_longer_than_the_context_are_skipped_and_counted(tmp_path, capsys):
    context = load_model("tiny").model.config.max_position_embeddings
    rows = GOOD + [{"id": "long", "prompt": "1+" * context + "1=", "answer": "2"}]
    assert main(["rollout", "--data", _jsonl(tmp_path / "train.jsonl", rows), "--k", "1", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["skipped_too_long"] == 1 and printed["n_prompts"] == len(GOOD)
    assert main(["rollout", "--data", _jsonl(tmp_path / "long.jsonl", rows[-1:]), "--k", "1", "--out",
                 str(tmp_path / "none")]) == 2
    assert "no prompt fits the model's context" in capsys.readouterr().err
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


# A completion's confidence, by the protocol's rule: the last "Confidence:" with a number, "%" divides by 100,
# clipped to [0, 1]; anything else is missing — counted as 0.0 and reported, never dropped.
COMPLETION_CASES = [
    ("no confidence", "12", None),
    ("several confidences: the last counts", "12\nConfidence: 0.2\nno, Confidence: 0.9", 0.9),
    ("malformed", "12\nConfidence: high", None),
    ("empty", "12\nConfidence:", None),
    ("above the range", "12\nConfidence: 1.7", 1.0),
    ("below the range", "12\nConfidence: -0.2", 0.0),
    ("a percentage", "12\nConfidence: 70%", 0.7),
    ("non-numeric", "12\nConfidence: nan", None),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in COMPLETION_CASES], ids=[c[0] for c in COMPLETION_CASES])
def test_completion_confidences_follow_the_protocol(text, expected):
    assert parse_confidence(text) == (pytest.approx(expected) if expected is not None else None)


def test_unreadable_confidences_are_counted_as_missing_not_dropped():
    task = get_task("arithmetic")
    [example] = task.examples_from_rows([{"prompt": "5+7=", "answer": "12"}])
    outputs = [[Completion(text=text, token_ids=[], finished=True) for _, text, _ in COMPLETION_CASES]]
    rows = score_completions(task, [example], outputs)
    assert len(rows) == len(COMPLETION_CASES)  # every completion is scored
    metrics = calibration_metrics([r["confidence"] for r in rows], [r["correct"] for r in rows])
    missing = sum(expected is None for _, _, expected in COMPLETION_CASES)
    assert metrics["missing_rate"] == pytest.approx(missing / len(COMPLETION_CASES))
    stated = [e if e is not None else 0.0 for _, _, e in COMPLETION_CASES]
    assert metrics["mean_confidence"] == pytest.approx(sum(stated) / len(stated))


def test_a_checkpoints_code_runs_only_when_the_user_opts_in(tmp_path, monkeypatch):
    folder = _checkpoint_with_code(tmp_path)
    monkeypatch.setenv("CAOPD_TRUST_REMOTE_CODE", "1")
    with pytest.raises(Exception):  # noqa: B017 -- this code defines no model; what matters is that it was run
        load_model(folder)
    assert (tmp_path / "ran").exists()
