"""Rollout estimation in shards (the pipeline's ParallelFor) and the merge step that joins them."""

import json

import pytest

from caopd.config.stages import ESTIMATES, ROLLOUTS, SUMMARY, RolloutConfig
from caopd.errors import CaopdInputError
from caopd.io import read_jsonl
from caopd.stages.estimate import merge_rollout_shards, run_rollout_estimation, shard


def test_shards_are_contiguous_and_cover_everything_once():
    items = list(range(10))
    parts = [shard(items, i, 3) for i in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shard(items[:2], 2, 3) == []


def test_merged_shards_hold_every_prompt_once(tmp_path, arithmetic_files):
    train, _ = arithmetic_files
    shard_dirs = []
    for index in range(2):
        cfg = RolloutConfig(data=str(train), k=2, shard_index=index, num_shards=2)
        run_rollout_estimation(cfg.model_copy(update={"sampling": cfg.sampling.model_copy(
            update={"max_new_tokens": 8})}), tmp_path / f"shard{index}", progress=False)
        shard_dirs.append(tmp_path / f"shard{index}")
    summary = merge_rollout_shards(shard_dirs, tmp_path / "merged")
    ids = [json.loads(line)["id"] for line in train.open()]
    estimates = read_jsonl(tmp_path / "merged" / ESTIMATES)
    assert sorted(e["prompt_id"] for e in estimates) == sorted(ids)
    assert all(e["n"] == 2 and e["p"] == e["n_correct"] / 2 for e in estimates)
    assert summary["n_rollouts"] == 2 * len(ids) == len(read_jsonl(tmp_path / "merged" / ROLLOUTS))
    shard_rows = sum(len(read_jsonl(d / ROLLOUTS)) for d in shard_dirs)
    assert shard_rows == summary["n_rollouts"]


def test_a_prompt_in_two_shards_is_an_error_and_nothing_is_written(tmp_path, arithmetic_files):
    train, _ = arithmetic_files
    cfg = RolloutConfig(data=str(train), k=1)
    run_rollout_estimation(cfg, tmp_path / "a", progress=False)
    run_rollout_estimation(cfg, tmp_path / "b", progress=False)
    with pytest.raises(CaopdInputError, match="also in shard") as info:
        merge_rollout_shards([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    assert "field 'prompt_id'" in str(info.value) and str(tmp_path / "b" / ROLLOUTS) in str(info.value)
    assert not (tmp_path / "merged" / SUMMARY).exists()
