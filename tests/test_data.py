import os

import numpy as np
import pytest

from caopd.errors import CaopdInputError
from caopd.io import (
    atomic_dir,
    file_digest,
    read_json,
    read_jsonl,
    read_parquet,
    rows_digest,
    write_json,
    write_jsonl,
    write_parquet,
)
from caopd.tasks import get_task
from caopd.tasks.datasets import load_examples, load_rows

ROWS = [
    {"id": "a", "prompt": "1+2=", "answer": "3", "kind": "add_1x1"},
    {"id": "b", "prompt": "7*8=", "answer": "56", "kind": "mul_1x1"},
]


def _siblings(path):
    """Everything in the folder of ``path`` other than ``path`` itself (leftover temp files)."""
    return sorted(p.name for p in path.parent.iterdir() if p != path)


# ---------------------------------------------------------------- round trips


def test_jsonl_round_trip_and_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, ROWS)
    assert load_rows(path) == ROWS
    path.write_text("\n" + path.read_text(encoding="utf-8") + "\n  \n", encoding="utf-8")
    assert load_rows(path) == ROWS


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "rows.parquet"
    write_parquet(path, ROWS)
    assert load_rows(path) == ROWS == read_parquet(path)


def test_load_from_disk_round_trip(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(tmp_path / "ds") == ROWS


def test_dataset_dict_names_its_splits_and_a_split_folder_loads(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CaopdInputError, match=r"DatasetDict with splits .*train.*pass one split"):
        load_rows(tmp_path / "dd")
    assert load_rows(tmp_path / "dd" / "test") == ROWS[:1]


def test_load_examples_builds_task_examples(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, ROWS)
    examples = load_examples(path, get_task("arithmetic"))
    assert [(e.id, e.answer) for e in examples] == [("a", "3"), ("b", "56")]


def test_writers_handle_numpy_and_unicode(tmp_path):
    row = {"p": np.float32(0.5), "n": np.int64(3), "flag": np.bool_(True), "v": np.arange(2),
           "text": "Äpfel → 苹果"}
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [row])
    assert "Äpfel → 苹果" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert read_jsonl(path) == [{"p": 0.5, "n": 3, "flag": True, "v": [0, 1], "text": "Äpfel → 苹果"}]
    write_json(tmp_path / "s.json", {"metrics": {"ece": np.float64(0.125)}, "path": tmp_path})
    assert read_json(tmp_path / "s.json") == {"metrics": {"ece": 0.125}, "path": str(tmp_path)}


def test_read_jsonl_of_empty_file_is_empty_but_load_rows_refuses(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    assert read_jsonl(path) == []
    with pytest.raises(CaopdInputError, match="empty"):
        load_rows(path)


# ---------------------------------------------------------------- bad inputs


def _error(path, task="arithmetic"):
    with pytest.raises(CaopdInputError) as info:
        load_examples(path, get_task(task))
    return str(info.value)


def test_missing_path(tmp_path):
    assert _error(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: does not exist"


def test_unknown_extension(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,answer\n1+1=,2\n", encoding="utf-8")
    message = _error(path)
    assert str(path) in message and "unknown dataset format '.csv'" in message


def test_empty_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"")
    assert _error(path) == f"{path}: dataset is empty"


def test_empty_parquet(tmp_path):
    import pyarrow as pa

    path = tmp_path / "rows.parquet"
    write_parquet(path, [], schema=pa.schema([("prompt", pa.string()), ("answer", pa.string())]))
    assert _error(path) == f"{path}: dataset is empty"


def test_missing_column_names_file_row_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [ROWS[0], {"id": "c", "prompt": "2+2="}])
    message = _error(path)
    assert message.startswith(f"{path}: row 1: field 'answer': missing required column")


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "caf\xe9", "answer": "2"}\n')
    message = _error(path)
    assert message.startswith(f"{path}: row 1: line 3: not UTF-8")


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n', encoding="utf-8")
    assert _error(path).startswith(f"{path}: row 1: line 2: invalid JSON")


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('["1+1=", "2"]\n', encoding="utf-8")
    assert _error(path) == f"{path}: row 0: line 1: expected a JSON object, got list"


def test_duplicate_ids(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [ROWS[0], ROWS[1], ROWS[0]])
    assert _error(path) == f"{path}: row 2: field 'id': duplicate id 'a' (first seen in row 0)"


def test_bad_field_value_names_field(tmp_path):
    path = tmp_path / "rows.parquet"
    write_parquet(path, [{"prompt": "1+1=", "answer": "two"}])
    assert _error(path).startswith(f"{path}: row 0: field 'answer': expected an integer")


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "junk").mkdir()
    assert "not a datasets.save_to_disk folder" in _error(tmp_path / "junk")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"not parquet at all")
    assert "not a readable Parquet file" in _error(path)


def test_invalid_json_document(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("{", encoding="utf-8")
    with pytest.raises(CaopdInputError, match=r"s\.json: invalid JSON"):
        read_json(path)


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"  # parent folders are created
    write_jsonl(path, ROWS)
    write_jsonl(path, ROWS[:1])  # overwrite
    assert read_jsonl(path) == ROWS[:1]
    assert _siblings(path) == []


@pytest.mark.parametrize("write", [write_jsonl, write_json])
def test_failed_serialization_keeps_the_old_file(tmp_path, write):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, ROWS)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="not JSON serializable"):
        write(path, [ROWS[0], {"bad": object()}])  # the first row is written before the second fails
    assert path.read_bytes() == before
    assert _siblings(path) == []


def test_failed_parquet_keeps_the_old_file(tmp_path):
    path = tmp_path / "rows.parquet"
    write_parquet(path, ROWS)
    before = path.read_bytes()
    with pytest.raises((TypeError, ValueError)):  # pyarrow's ArrowTypeError / ArrowInvalid
        write_parquet(path, [{"x": 1}, {"x": object()}])
    assert path.read_bytes() == before
    assert _siblings(path) == []


def test_atomic_dir_renames_into_place_and_replaces(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not target.exists()
        (tmp / "weights.bin").write_bytes(b"v1")
    assert (target / "weights.bin").read_bytes() == b"v1"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}", encoding="utf-8")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # replaced, not merged
    assert _siblings(target) == []


def test_atomic_dir_removes_temp_folder_on_error(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise RuntimeError("crash mid-save")
    assert (target / "weights.bin").read_bytes() == b"v1"  # the old checkpoint survives
    assert _siblings(target) == []


# ---------------------------------------------------------------- digests


def test_file_digest_is_sha256_and_returned_by_writers(tmp_path):
    import hashlib

    path = tmp_path / "rows.jsonl"
    assert write_jsonl(path, ROWS) == file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert write_parquet(tmp_path / "rows.parquet", ROWS) == file_digest(tmp_path / "rows.parquet")


def test_folder_digest_depends_on_names_and_content_only(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "w.bin").write_bytes(b"weights")
        (tmp_path / name / "config.json").write_text("{}", encoding="utf-8")
    os.utime(tmp_path / "b" / "config.json", (0, 0))
    assert file_digest(tmp_path / "a") == file_digest(tmp_path / "b")
    (tmp_path / "b" / "sub" / "w.bin").rename(tmp_path / "b" / "sub" / "w2.bin")
    assert file_digest(tmp_path / "a") != file_digest(tmp_path / "b")


def test_rows_digest_ignores_key_order_and_format(tmp_path):
    reordered = [dict(reversed(list(row.items()))) for row in ROWS]
    assert rows_digest(ROWS) == rows_digest(reordered)
    assert rows_digest(ROWS) != rows_digest(ROWS[::-1])
    write_parquet(tmp_path / "r.parquet", ROWS)
    write_jsonl(tmp_path / "r.jsonl", ROWS)
    assert rows_digest(load_rows(tmp_path / "r.parquet")) == rows_digest(load_rows(tmp_path / "r.jsonl"))
    assert rows_digest([{"p": np.float64(0.5)}]) == rows_digest([{"p": 0.5}])
    # pinned: artifact lineage keys on it, so a change of canonical form must be deliberate
    assert rows_digest(ROWS) == "13ee4a35469eda4e7e95a50fe8513fcfa922618151b35c8aea433e90aa301406"
