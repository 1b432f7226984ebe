"""The one mapping between the configs and the pipeline's parameters (caopd.config.parameters): it covers the
pipeline's signature, names real config fields, gives every parameter of the compiled spec its description, and
carries a RunConfig's values to the right pipeline arguments and back into each arm's TrainConfig."""

import inspect
from pathlib import Path

import pytest
import yaml

from caopd.components import (
    calibration_evaluation,
    data_preparation,
    opd_training,
    rollout_estimation,
    target_replacement,
)
from caopd.config.parameters import (
    ARM_FIELDS,
    BY_NAME,
    PARAMETERS,
    arm_train_config,
    as_field_value,
    config_values,
    field_default,
    field_info,
    train_fields_set_by_the_run,
)
from caopd.config.run import RunConfig
from caopd.config.sampling import SamplingConfig
from caopd.config.stages import DataConfig, EvaluateConfig, RolloutConfig, TargetsConfig, TrainStageConfig
from caopd.config.training import TrainConfig
from caopd.kfp.local import pipeline_arguments
from caopd.pipelines import caopd_pipeline, compile_pipeline

SIGNATURE = inspect.signature(caopd_pipeline.pipeline_func).parameters
DEFAULTS = {name: p.default for name, p in SIGNATURE.items()}
# Pipeline defaults that differ from a config field they feed, on purpose.
OWN_DEFAULTS = {("eval_seed", "EvaluateConfig.sampling.seed")}  # `caopd run --seed 0` evaluates with seed 1
# Inputs of the config-building components that are no pipeline parameter: set per task by the pipeline.
PER_TASK_INPUTS = {"data", "rollouts", "records", "models", "method", "shard_index", "workspace_pvc", "pipeline_run_id"}


@pytest.fixture(scope="module")
def root_parameters(tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "caopd_pipeline.yaml")
    pipeline, _platform = yaml.safe_load_all(path.read_text())
    return pipeline["root"]["inputDefinitions"]["parameters"]


def test_every_pipeline_parameter_has_its_description_in_the_compiled_spec(root_parameters):
    assert len(root_parameters) == len(PARAMETERS) == 59
    for name, spec in root_parameters.items():
        assert spec.get("description", "").strip(), f"{name} has no description in the compiled spec"
        assert spec["description"] == BY_NAME[name].description, name


def test_the_mapping_is_the_pipeline_signature_in_its_order():
    assert [p.name for p in PARAMETERS] == list(SIGNATURE)


def test_every_field_the_mapping_names_is_a_real_config_field_with_a_description():
    for p in PARAMETERS:
        assert p.feeds or p.help, f"{p.name}: a pipeline-only parameter needs its own help"
        for target in p.feeds:
            info = field_info(target)  # KeyError: no such config or field
            assert target != p.home or p.help or info.description, target
        assert p.description and "\n" not in p.description, p.name  # one Args: line each
    for target in ARM_FIELDS:
        field_info(target)


def test_every_run_path_is_a_real_run_config_field_and_every_run_field_is_read():
    run, read = RunConfig(), set()
    for p in PARAMETERS:
        if isinstance(p.run, str):
            p.from_run(run)  # AttributeError: no such field
            read.add(p.run.split(".")[0])
    # `train`'s other fields travel in train_options; `cache` is the local runner's own; `preset` is resolved into
    # the values when the run config is built.
    assert read | {"train", "cache", "preset"} == set(RunConfig.model_fields)


def test_pipeline_defaults_are_the_defaults_of_every_config_field_they_feed():
    for p in PARAMETERS:
        for target in p.feeds:
            if (p.name, target) in OWN_DEFAULTS:
                continue
            assert as_field_value(p, DEFAULTS[p.name], target) == field_default(target), (p.name, target)


@pytest.mark.parametrize("component, configs", [(opd_training, (TrainConfig, TrainStageConfig)),
                                                (data_preparation, (DataConfig,)),
                                                (rollout_estimation, (RolloutConfig,)),
                                                (target_replacement, (TargetsConfig,)),
                                                (calibration_evaluation, (EvaluateConfig,))])
def test_the_config_building_components_take_every_parameter_that_feeds_their_configs(component, configs):
    inputs = set(component.component_spec.inputs)
    for config in configs:
        feeders = {p.name for p in PARAMETERS if config_values(config, {p.name: DEFAULTS[p.name]})}
        assert feeders <= inputs, (component.name, sorted(feeders - inputs))
    assert inputs - set(BY_NAME) <= PER_TASK_INPUTS, component.name
    assert "preset" in inputs, component.name  # every config-building stage applies the preset
    assert TrainConfig not in configs or "train_options" in inputs


def _run_config():
    return RunConfig(model="base", seed=3, k=4, teacher_context="correct_solution", train_baseline=False, n_train=10,
                     ood_kinds=["mul_2x2"], rollout={"temperature": 0.7, "max_new_tokens": 16},
                     evaluation={"temperature": 0.0, "top_p": 0.5, "max_new_tokens": 40}, prompt={"thinking": "off"},
                     train={"lr": 0.01, "variant": "decoupled", "divergence": "jsd", "beta": 0.25, "steps": 7,
                            "warmup_steps": 3, "confidence_weight": 2.0,
                            "sampling": {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 20}})


def test_a_run_configs_values_arrive_at_the_right_pipeline_arguments(tmp_path):
    args = pipeline_arguments(_run_config(), tmp_path)
    assert set(args) <= set(SIGNATURE)
    assert (args["lr"], args["variant"], args["divergence"], args["beta"], args["steps"]) == (
        0.01, "decoupled", "jsd", 0.25, 7)
    assert (args["rollout_temperature"], args["rollout_max_new_tokens"], args["k"]) == (0.7, 16, 4)
    assert (args["train_temperature"], args["train_top_p"], args["train_max_new_tokens"]) == (0.9, 0.95, 20)
    assert (args["eval_temperature"], args["eval_top_p"], args["eval_max_new_tokens"]) == (0.0, 0.5, 40)
    assert (args["thinking"], args["ask_confidence"], args["preset"]) == ("off", True, "")
    assert (args["base_model"], args["seed"], args["eval_seed"]) == ("base", 3, 4)
    assert (args["teacher_context"], args["train_baseline"], args["n_train"], args["ood_kinds"]) == (
        "correct_solution", False, 10, ["mul_2x2"])
    # None is no KFP value: the pipeline's stand-ins
    assert (args["top_k"], args["teacher_model"]) == (0, "")
    # only the TrainConfig fields without a parameter of their own, and only where they differ from the defaults
    assert args["train_options"] == {"warmup_steps": 3, "confidence_weight": 2.0}
    assert args["mlflow_settings"]["tracking_uri"] == f"sqlite:///{Path(tmp_path) / 'mlflow.db'}"
    # the pipeline's own defaults stand for the rest
    assert "train_launch" not in args and "gpu_tolerations" not in args


def test_each_arm_trains_the_run_configs_settings():
    cfg = _run_config()
    values = {**DEFAULTS, **pipeline_arguments(cfg, Path("mlflow"))}
    expected = cfg.train.model_copy(update={
        "k": cfg.k, "seed": cfg.seed, "teacher_context": cfg.teacher_context,
        "sampling": SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=20, seed=cfg.seed)})
    assert arm_train_config("caopd", values) == expected
    # decoupled is CaOPD's loss: the plain-OPD baseline trains faithful, everything else the same
    assert arm_train_config("opd", values) == expected.model_copy(update={"method": "opd", "variant": "faithful"})
    assert TrainStageConfig(**config_values(TrainStageConfig, values), records="r", train=expected) == \
        TrainStageConfig(model="base", task="arithmetic", records="r", train=expected, prompt={"thinking": "off"})


def test_the_none_stand_ins_turn_back_into_none():
    values = {**DEFAULTS, "teacher": "separate", "teacher_model": "teacher-folder", "top_k": 5}
    train = arm_train_config("caopd", values)
    assert (train.teacher_model, train.top_k) == ("teacher-folder", 5)
    train = arm_train_config("caopd", DEFAULTS)
    assert (train.teacher_model, train.top_k) == (None, None)
    assert train == TrainConfig(sampling=SamplingConfig(max_new_tokens=24))  # the pipeline's defaults: TrainConfig's


def test_train_options_cannot_set_what_a_parameter_or_the_arm_sets():
    for options, named in [({"lr": 0.1}, "lr"), ({"sampling": {}}, "temperature"), ({"method": "rlcr"}, "method")]:
        with pytest.raises(ValueError, match=named):
            arm_train_config("caopd", {**DEFAULTS, "train_options": options})


def test_a_run_config_refuses_train_fields_the_run_sets_itself():
    assert set(train_fields_set_by_the_run()) == {"method", "k", "seed", "teacher_context", "sampling.seed"}
    for train, words in [({"k": 4}, "`k`"), ({"seed": 1}, "`seed`"), ({"method": "opd"}, "the arm it trains"),
                         ({"sampling": {"seed": 5}}, "train.sampling.seed .*`seed`")]:
        with pytest.raises(ValueError, match=words):
            RunConfig(train=train)
    RunConfig(train={"sampling": {"temperature": 0.5}})  # the training samples' own decoding is the run's to set
    # a saved run config (its train holds those fields at their defaults) still loads
    RunConfig.model_validate(_run_config().model_dump())
