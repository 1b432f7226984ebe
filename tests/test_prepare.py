"""Data preparation: the same config gives the same prompts, whatever order its kind weights arrive in; kinds held
out for the out-of-distribution set never reach training."""

import pytest

from caopd.config.stages import DEFAULT_KIND_WEIGHTS, TRAIN, DataConfig
from caopd.stages.prepare import run_data_preparation


def test_kind_weight_order_does_not_change_the_data(tmp_path):
    shuffled = dict(reversed(list(DEFAULT_KIND_WEIGHTS.items())))
    assert list(shuffled) != list(DEFAULT_KIND_WEIGHTS)
    for name, weights in (("a", DEFAULT_KIND_WEIGHTS), ("b", shuffled)):
        run_data_preparation(DataConfig(n_train=50, n_eval=5, kind_weights=weights), tmp_path / name)
    assert (tmp_path / "a" / TRAIN).read_bytes() == (tmp_path / "b" / TRAIN).read_bytes()


def test_ood_kinds_are_held_out_of_training_and_scored_apart(tmp_path):
    from caopd.config.stages import OOD, TRAIN
    from caopd.io import read_jsonl

    summary = run_data_preparation(DataConfig(n_train=60, n_eval=30, ood_kinds=["mul_2x2", "add_1x1"]), tmp_path)
    train_kinds = {row["kind"] for row in read_jsonl(tmp_path / TRAIN)}
    eval_kinds = {row["kind"] for row in read_jsonl(tmp_path / "eval.jsonl")}
    ood_rows = read_jsonl(tmp_path / OOD)
    assert summary["n_ood"] == len(ood_rows) == 30
    assert {row["kind"] for row in ood_rows} == {"add_1x1", "mul_2x2"}
    assert not (train_kinds | eval_kinds) & {"add_1x1", "mul_2x2"}
    assert not {row["id"] for row in ood_rows} & {row["id"] for row in read_jsonl(tmp_path / TRAIN)}


@pytest.mark.parametrize("bad, message", [
    ({"ood_kinds": ["div_9x9"]}, "unknown arithmetic kinds"),
    ({"ood_kinds": ["add_1x1"], "kind_weights": {"add_1x1": 1.0}}, "leave no kind"),
    ({"ood_kinds": ["add_1x1"], "train_source": "t.jsonl", "eval_source": "e.jsonl"}, "--extra-data"),
])
def test_bad_ood_settings_are_refused_up_front(bad, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**bad)


CHEMISTRY_ROWS = __import__("pathlib").Path(__file__).with_name("fixtures") / "sciknoweval_chemistry_rows.jsonl"


def test_an_ood_set_of_another_task_is_validated_by_that_task(tmp_path):
    from caopd.config.stages import OOD
    from caopd.io import read_jsonl
    from caopd.stages.prepare import ood_set

    summary = run_data_preparation(DataConfig(n_train=10, n_eval=5, ood_source=str(CHEMISTRY_ROWS),
                                              ood_task="mcq"), tmp_path / "cross")
    assert summary["n_ood"] == len(read_jsonl(tmp_path / "cross" / OOD)) == 6
    assert ood_set(tmp_path / "cross") == (str(tmp_path / "cross" / OOD), "mcq")
    run_data_preparation(DataConfig(n_train=10, n_eval=5, ood_kinds=["mul_2x2"]), tmp_path / "kinds")
    assert ood_set(tmp_path / "kinds") == (str(tmp_path / "kinds" / OOD), "arithmetic")
    run_data_preparation(DataConfig(n_train=10, n_eval=5), tmp_path / "none")
    assert ood_set(tmp_path / "none") is None


def test_an_ood_set_that_its_task_cannot_read_names_file_row_and_field(tmp_path):
    from caopd.errors import CaopdInputError

    with pytest.raises(CaopdInputError, match=r"sciknoweval_chemistry_rows\.jsonl.*row 0.*prompt"):
        run_data_preparation(DataConfig(n_train=10, n_eval=5, ood_source=str(CHEMISTRY_ROWS)), tmp_path / "d")
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


@pytest.mark.parametrize("bad, message", [
    ({"ood_task": "mcq"}, "give ood_source too"),
    ({"ood_source": "o.jsonl", "ood_task": "poetry"}, "unknown task"),
    ({"ood_source": "o.jsonl", "ood_kinds": ["add_1x1"]}, "not both"),
])
def test_bad_ood_source_settings_are_refused_up_front(bad, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**bad)


def test_dataset_paths_cannot_escape_the_data_root(tmp_path, monkeypatch, capsys):
    from caopd.cli import main
    from caopd.io import write_jsonl
    from caopd.tasks.arithmetic import generate_rows
    from caopd.tasks.datasets import DATA_ROOT_ENV

    root, outside = tmp_path / "data", tmp_path / "private"
    root.mkdir(), outside.mkdir()
    rows = generate_rows(4, 0, ["add_1x1"])
    for folder in (root, outside):
        write_jsonl(folder / "train.jsonl", rows)
        write_jsonl(folder / "eval.jsonl", rows)
    (root / "link.jsonl").symlink_to(outside / "train.jsonl")
    ok = DataConfig(train_source="train.jsonl", eval_source=str(root / "eval.jsonl"), data_root=str(root))
    assert run_data_preparation(ok, tmp_path / "ok")["n_train"] == 4  # relative to the root, or absolute inside it
    for bad in ("../private/train.jsonl", str(outside / "train.jsonl"), "link.jsonl"):
        with pytest.raises(ValueError, match="outside the data root"):
            DataConfig(train_source=bad, eval_source="eval.jsonl", data_root=str(root))
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))  # how a platform confines every run
    assert main(["prepare", "--out", str(tmp_path / "out"), "--train-source", "../private/train.jsonl",
                 "--eval-source", "eval.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "outside the data root" in err and "train_source" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
