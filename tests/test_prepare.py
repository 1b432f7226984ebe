"""Data preparation: the same config gives the same prompts, whatever order its kind weights arrive in."""

from caopd.stages.prepare import DEFAULT_KIND_WEIGHTS, TRAIN, DataConfig, run_data_preparation


def test_kind_weight_order_does_not_change_the_data(tmp_path):
    shuffled = dict(reversed(list(DEFAULT_KIND_WEIGHTS.items())))
    assert list(shuffled) != list(DEFAULT_KIND_WEIGHTS)
    for name, weights in (("a", DEFAULT_KIND_WEIGHTS), ("b", shuffled)):
        run_data_preparation(DataConfig(n_train=50, n_eval=5, kind_weights=weights), tmp_path / name)
    assert (tmp_path / "a" / TRAIN).read_bytes() == (tmp_path / "b" / TRAIN).read_bytes()
