"""The paper's recipes as presets: every value names a real parameter or training field, reaches the stage configs
where it belongs, yields to the user's own values, and is listed in the docs with its source."""

from pathlib import Path

import pytest

from caopd.cli import build_parser
from caopd.cli.options import config_from_args
from caopd.config.parameters import BY_NAME, field_default, pipeline_default
from caopd.config.presets import (
    PRESETS,
    check_pipeline_values,
    get_preset,
    merge_over_preset,
    preset_config,
    with_preset,
)
from caopd.config.run import RunConfig
from caopd.config.stages import EvaluateConfig, RolloutConfig, TrainStageConfig
from caopd.config.training import TrainConfig
from caopd.kfp.local import pipeline_arguments, pipeline_defaults

DOCS = Path(__file__).resolve().parents[1] / "docs" / "paper-setup.md"


def test_every_preset_value_is_a_pipeline_parameter_or_a_training_field_and_each_has_a_source():
    for preset in PRESETS.values():
        for name in preset.values:
            assert BY_NAME[name].home, name  # a parameter that feeds a config
        TrainConfig(**preset.train_options)  # real fields, valid values
        assert set(preset.sources) == set(preset.values) | set(preset.train_options), preset.name


def test_the_signature_defaults_are_the_ones_the_preset_rule_compares_with():
    defaults = pipeline_defaults()
    for preset in PRESETS.values():
        for name in [*preset.values, "steps"]:
            assert defaults[name] == pipeline_default(name), name


def test_a_parameter_left_at_its_default_takes_the_presets_value_and_any_other_value_wins():
    values = {**pipeline_defaults(), "preset": "paper-tooluse", "lr": 3e-5, "train_options": {"skip_first_tokens": 5}}
    out = with_preset(values)
    assert out["task"] == "tooluse" and out["eval_temperature"] == 0.0 and out["rollout_max_new_tokens"] == 1024
    assert out["lr"] == 3e-5  # given, so kept
    assert out["train_options"]["skip_first_tokens"] == 5 and out["train_options"]["lr_schedule"] == "cosine"
    assert out["train_options"]["epochs"] == 1.0


def test_explicit_steps_replace_the_presets_epochs_and_explicit_warmup_steps_its_ratio():
    values = {**pipeline_defaults(), "preset": "paper-science", "steps": 2,
              "train_options": {"warmup_steps": 1}}
    options = with_preset(values)["train_options"]
    assert "epochs" not in options and "warmup_ratio" not in options
    assert options["warmup_steps"] == 1 and options["max_prompt_tokens"] == 1024
    merged = merge_over_preset(preset_config("paper-science", TrainStageConfig), {"train": {"steps": 2}})
    assert "epochs" not in merged["train"] and merged["train"]["steps"] == 2
    TrainStageConfig(**merged, records="r")


def test_no_preset_changes_nothing():
    values = pipeline_defaults()
    assert with_preset(values) == values
    assert get_preset("") is None
    with pytest.raises(ValueError, match="paper-tooluse"):
        get_preset("paper")


def test_stage_configs_under_a_preset_carry_the_official_values():
    rollout = RolloutConfig(**preset_config("paper-tooluse", RolloutConfig), data="d")
    assert (rollout.task, rollout.k, rollout.sampling.temperature, rollout.sampling.max_new_tokens) == (
        "tooluse", 8, 1.0, 1024)
    evaluation = EvaluateConfig(**preset_config("paper-science", EvaluateConfig), models={"m": "tiny"}, data="d")
    assert (evaluation.task, evaluation.sampling.temperature, evaluation.sampling.max_new_tokens) == ("mcq", 0.0, 2048)
    train = TrainStageConfig(**preset_config("paper-tooluse", TrainStageConfig), records="r").train
    assert (train.lr, train.lr_schedule, train.warmup_ratio, train.epochs, train.prompts_per_step) == (
        2e-5, "cosine", 0.1, 1.0, 4)
    assert (train.teacher, train.ema_rate, train.loss_normalization, train.skip_first_tokens,
            train.max_prompt_tokens, train.sampling.max_new_tokens) == ("ema", 0.01, "sequence", 3, 1024, 1024)


def test_the_stage_commands_take_a_preset_and_their_flags_win():
    parser = build_parser()
    args = parser.parse_args(["train", "--out", "o", "--records", "r.jsonl", "--preset", "paper-tooluse",
                              "--train.lr", "1e-5", "--train.steps", "3"])
    cfg = config_from_args(TrainStageConfig, args)
    assert (cfg.train.lr, cfg.train.steps, cfg.train.epochs, cfg.train.lr_schedule) == (1e-5, 3, None, "cosine")
    args = parser.parse_args(["rollout", "--out", "o", "--data", "d.jsonl", "--preset", "paper-science"])
    assert config_from_args(RolloutConfig, args).task == "mcq"


def test_caopd_run_checks_every_stage_config_under_its_preset_before_it_starts(tmp_path):
    cfg = RunConfig(preset="paper-tooluse", train_source="t.jsonl", eval_source="e.jsonl", train={"steps": 2})
    configs = check_pipeline_values({**pipeline_defaults(), **pipeline_arguments(cfg, tmp_path)})
    assert configs["data"].task == "tooluse"
    assert configs["rollout"].sampling.max_new_tokens == 1024
    assert configs["evaluation"].sampling.temperature == 0.0
    assert configs["train_caopd"].train.steps == 2 and configs["train_caopd"].train.epochs is None
    with pytest.raises(ValueError, match="train_source and eval_source"):  # the preset's task needs data
        check_pipeline_values({**pipeline_defaults(), **pipeline_arguments(RunConfig(preset="paper-tooluse"),
                                                                          tmp_path)})


def test_the_docs_list_every_presets_values_with_their_sources():
    text = DOCS.read_text(encoding="utf-8")
    for preset in PRESETS.values():
        assert f"`{preset.name}`" in text
        for key in [*preset.values, *preset.train_options]:
            assert f"| `{key}` |" in text, key
    # the defaults the presets replace are the tiny model's
    assert field_default("TrainConfig.lr") == 1.5e-4


def test_caopd_runs_values_win_over_its_preset_even_when_they_equal_the_tiny_default(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["run", "--out", "o", "--preset", "paper-tooluse", "--train-source", "t.jsonl",
                              "--eval-source", "e.jsonl", "--train.teacher", "frozen", "--train.prompts-per-step",
                              "16", "--evaluation.temperature", "1.0", "--train.steps", "3"])
    cfg = config_from_args(RunConfig, args)
    assert (cfg.train.teacher, cfg.train.prompts_per_step, cfg.evaluation.temperature) == ("frozen", 16, 1.0)
    assert (cfg.train.steps, cfg.train.epochs, cfg.train.lr_schedule, cfg.rollout.max_new_tokens) == (
        3, None, "cosine", 1024)  # the rest is the preset's
    arguments = pipeline_arguments(cfg, tmp_path)
    assert arguments["preset"] == "" and arguments["teacher"] == "frozen"  # the pipeline gets resolved values
    configs = check_pipeline_values({**pipeline_defaults(), **arguments})
    assert configs["train_caopd"].train.teacher == "frozen" and configs["evaluation"].sampling.temperature == 1.0
    assert RunConfig.model_validate(cfg.model_dump()) == cfg  # a saved run config loads as it was
