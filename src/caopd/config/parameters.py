"""The pipeline's parameters: the one table between the configs and the Kubeflow pipeline (torch-free).

Each row is one pipeline parameter: its name, the config fields it feeds (``"TrainConfig.lr"``,
``"TrainConfig.sampling.temperature"``; the first is its home, whose ``Field(description=...)`` becomes the
parameter's description in the compiled spec and the Kubeflow UI's Create-run form), where ``caopd run`` reads
it from a RunConfig, and the value standing for the field's None (KFP parameters cannot be None).

Everything that used to repeat the list reads it here instead:

* the pipeline's docstring ``Args:`` section, from which kfp fills each parameter's description
  (``pipeline_docstring``);
* ``caopd run``'s pipeline arguments from a RunConfig (``run_arguments``, with ``train_options`` for the
  TrainConfig fields no parameter of their own carries);
* the training and data-preparation components' configs, built from their inputs (``config_values``,
  ``arm_train_config``); the pipeline wires those components' inputs by name.

Pipeline-only parameters (GPU pods, tracking, the arms) feed no config field and carry their own description.
``tests/test_parameters.py`` checks that this table, the pipeline's signature, the components and the configs agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from caopd.config.experiments import ContinualStepConfig
from caopd.config.launch import CPU_PER_GPU, MEMORY_GI_PER_GPU
from caopd.config.stages import (
    DataConfig,
    EvaluateConfig,
    RegisterConfig,
    RolloutConfig,
    TargetsConfig,
    TrainStageConfig,
)
from caopd.config.training import TrainConfig

# The configs a parameter may feed, by the name its rows spell.
CONFIGS: dict[str, type[BaseModel]] = {config.__name__: config for config in (
    DataConfig, RolloutConfig, TargetsConfig, TrainConfig, TrainStageConfig, EvaluateConfig, RegisterConfig,
    ContinualStepConfig)}

# Set by the pipeline itself for each arm of its ParallelFor (caopd, and opd with train_baseline), not by a parameter.
ARM_FIELDS = ("TrainConfig.method", "TargetsConfig.method")

_NO_STAND_IN = object()


@dataclass(frozen=True)
class Parameter:
    """One pipeline parameter.

    ``feeds``: the config fields it sets, as ``Config.field`` or ``Config.field.subfield``; the first is its home
    (its description and default). ``help`` replaces the home's description (pipeline-only parameters, or a field
    the pipeline spells differently); ``note`` is appended to it. ``run``: where ``caopd run`` takes the value
    from (a dotted path into RunConfig, or a function of it); None = the pipeline's default. ``none``: the
    parameter's value that stands for the field's None.
    """

    name: str
    feeds: tuple[str, ...] = ()
    run: str | Callable[[Any], Any] | None = None
    help: str = ""
    note: str = ""
    none: Any = _NO_STAND_IN

    @property
    def home(self) -> str | None:
        return self.feeds[0] if self.feeds else None

    @property
    def description(self) -> str:
        text = self.help or field_info(self.feeds[0]).description or ""
        return f"{text}; {self.note}" if self.note else text

    def to_config(self, value: Any) -> Any:
        """The pipeline's value as its fields take it."""
        return None if self.none is not _NO_STAND_IN and value == self.none else value

    def to_pipeline(self, value: Any) -> Any:
        """A config value as the pipeline takes it."""
        return self.none if value is None and self.none is not _NO_STAND_IN else value

    def from_run(self, run: Any) -> Any:
        """This parameter's value for a RunConfig (``run`` must not be None)."""
        if callable(self.run):
            return self.to_pipeline(self.run(run))
        value = run
        for part in self.run.split("."):
            value = getattr(value, part)
        return self.to_pipeline(value)


def _gpu(text: str) -> str:
    return f"GPU pods (rollout estimation, training, evaluation, the forgetting check): {text}"


# Every stage that renders prompts carries the same prompt settings.
_PROMPTED = ("RolloutConfig", "TargetsConfig", "TrainStageConfig", "EvaluateConfig")


def _prompt(field: str) -> Parameter:
    return Parameter(field, tuple(f"{config}.prompt.{field}" for config in _PROMPTED), run=f"prompt.{field}",
                     note="in every stage that renders prompts")


def _decoding(stage: str, config: str, run: str, where: str) -> tuple[Parameter, ...]:
    return tuple(Parameter(f"{stage}_{field}", (f"{config}.sampling.{field}",), run=f"{run}.{field}",
                           note=f"{where}") for field in ("temperature", "top_p", "max_new_tokens"))


# In the pipeline signature's order: by stage, as the pipeline runs them.
PARAMETERS: tuple[Parameter, ...] = (
    # `caopd run` resolves its preset itself (the values it was given win exactly) and passes the resolved values.
    Parameter("preset", run=lambda run: "",
              help="a recipe of the paper: paper-tooluse or paper-science, every hyperparameter as the official "
                   "scripts set it (docs/paper-setup.md); a parameter left at its default takes the preset's value, "
                   "any other value wins; empty = none"),
    # 0 · data preparation
    Parameter("task", ("DataConfig.task", "RolloutConfig.task", "TargetsConfig.task", "TrainStageConfig.task",
                       "EvaluateConfig.task", "ContinualStepConfig.task"), run="task"),
    Parameter("train_source", ("DataConfig.train_source",), run="train_source"),
    Parameter("eval_source", ("DataConfig.eval_source",), run="eval_source"),
    Parameter("n_train", ("DataConfig.n_train",), run="n_train"),
    Parameter("n_eval", ("DataConfig.n_eval",), run="n_eval"),
    Parameter("kind_weights", ("DataConfig.kind_weights",), run="kind_weights"),
    Parameter("ood_kinds", ("DataConfig.ood_kinds",), run="ood_kinds"),
    Parameter("ood_source", ("DataConfig.ood_source",)),
    Parameter("ood_task", ("DataConfig.ood_task",)),
    Parameter("continual_kinds", ("DataConfig.continual_kinds",), run="continual_kinds"),
    Parameter("seed", ("DataConfig.seed", "RolloutConfig.sampling.seed", "TrainConfig.seed",
                       "TrainConfig.sampling.seed"), run="seed",
              help="seed of the data, the rollouts and the training (the synthetic held-out prompts use "
                   "seed + 10000; evaluation samples with eval_seed)"),
    # how prompts reach the model, in every stage
    _prompt("thinking"),
    _prompt("ask_confidence"),
    _prompt("confidence_instruction"),
    # 1 · rollout estimation
    Parameter("base_model", ("RolloutConfig.model", "TargetsConfig.model", "TrainStageConfig.model",
                             "RegisterConfig.base_model"), run="model",
              note="the base arm, and the start of every trained arm; also s3://BUCKET/FOLDER or "
                   "models:/NAME@ALIAS (the registry, e.g. the champion to continue from)"),
    Parameter("k", ("RolloutConfig.k", "TrainConfig.k"), run="k",
              note="in rollout estimation and in every training step"),
    *_decoding("rollout", "RolloutConfig", "rollout", "of the rollouts that estimate P"),
    Parameter("rollout_shards", ("RolloutConfig.num_shards",), run="rollout_shards",
              help="rollout-estimation shards, one pod each: the training prompts are split into this many "
                   "contiguous parts and merged afterwards"),
    Parameter("engine", ("RolloutConfig.engine", "EvaluateConfig.engine", "ContinualStepConfig.engine"),
              note="in rollout estimation, evaluation and the forgetting check (task B)"),
    # 2 · target replacement
    Parameter("teacher_context", ("TargetsConfig.teacher_context", "TrainConfig.teacher_context"),
              run="teacher_context"),
    # 3 · OPD training
    Parameter("train_baseline", run="train_baseline",
              help="also train plain OPD (the baseline arm) beside CaOPD, from the same rollouts"),
    Parameter("divergence", ("TrainConfig.divergence",), run="train.divergence"),
    Parameter("beta", ("TrainConfig.beta",), run="train.beta"),
    Parameter("top_k", ("TrainConfig.top_k",), run="train.top_k", none=0,
              help="restrict the divergence to the teacher's top-k tokens; 0 = the full vocabulary"),
    Parameter("variant", ("TrainConfig.variant",), run="train.variant",
              note="decoupled applies to the CaOPD arm only: plain OPD has no P to train its confidence towards, "
                   "so the baseline arm trains faithful (recorded in its model's metadata)"),
    Parameter("teacher", ("TrainConfig.teacher",), run="train.teacher"),
    Parameter("teacher_model", ("TrainConfig.teacher_model",), run="train.teacher_model", none="",
              help="the separate teacher (teacher='separate'): a local folder or hub id with the student's "
                   "tokenizer; empty = none"),
    Parameter("ema_rate", ("TrainConfig.ema_rate",), run="train.ema_rate"),
    Parameter("p_source", ("TrainConfig.p_source",), run="train.p_source"),
    Parameter("steps", ("TrainConfig.steps",), run="train.steps"),
    Parameter("prompts_per_step", ("TrainConfig.prompts_per_step",), run="train.prompts_per_step"),
    Parameter("lr", ("TrainConfig.lr",), run="train.lr"),
    Parameter("precision", ("TrainConfig.precision",), run="train.precision"),
    Parameter("finetune", ("TrainConfig.finetune",), run="train.finetune",
              note='the adapters\' settings through train_options, e.g. {"lora": {"r": 32}}'),
    Parameter("activation_checkpointing", ("TrainConfig.activation_checkpointing",),
              run="train.activation_checkpointing"),
    *_decoding("train", "TrainConfig", "train.sampling", "of the on-policy training samples"),
    Parameter("train_options", run=lambda run: train_options(run.train),
              help='any other TrainConfig field by name, e.g. {"warmup_steps": 20, "micro_batch_size": 32, '
                   '"teacher_server": "http://teacher:8000"}; validated with the rest'),
    Parameter("train_launch", ("TrainStageConfig.launch",),
              note='{} = in the training pod; {"procs_per_node": 4} = torchrun over its 4 GPUs; {"kind": '
                   '"trainjob" | "pytorchjob", "num_nodes": ...} = a job on several nodes (LaunchConfig\'s '
                   'fields; needs a pipeline compiled with a workspace PVC)'),
    Parameter("train_sharding", ("TrainStageConfig.sharding",)),
    Parameter("train_engine", ("TrainStageConfig.engine",)),
    Parameter("training_gpus",
              help="GPUs of each training pod (accelerator_count sets the other GPU stages'); 0 when train_launch "
                   "runs the training as a job on other nodes"),
    # 4 · calibration evaluation
    *_decoding("eval", "EvaluateConfig", "evaluation", "of the calibration evaluation and the forgetting check"),
    Parameter("eval_seed", ("EvaluateConfig.sampling.seed",), run=lambda run: run.seed + 1,
              help="sampling seed of the calibration evaluation and of the forgetting check (`caopd run` uses "
                   "seed + 1)"),
    # 5 · model registration
    Parameter("model_name", ("RegisterConfig.name",)),
    Parameter("promotion_gates", ("RegisterConfig.gates",),
              note='GateConfig\'s fields, e.g. {"mode": "dry-run", "max_ece": 0.1}; {} = the defaults'),
    # tracking, for every stage
    Parameter("mlflow_settings",
              help='MLflow for every stage: {"tracking_uri": ..., "experiment": ..., "artifact_root": "s3://..."} '
                   "(TrackingConfig's fields); {} = $MLFLOW_TRACKING_URI when the cluster injects it, else no "
                   "tracking and a registry kept in the artifact store"),
    # GPU pods
    Parameter("accelerator_type", help=_gpu("the extended resource that counts the GPUs")),
    Parameter("accelerator_count", help=_gpu("GPUs per pod; the training pods have training_gpus")),
    Parameter("gpu_node_selector",
              help=_gpu('node selector, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}')),
    Parameter("gpu_tolerations", help=_gpu("tolerations, as a pod spec writes them")),
    Parameter("gpu_cpu_request", help=_gpu(f"CPU request and limit, e.g. '16' or '7500m'; empty = {CPU_PER_GPU} per "
                                           "GPU the pod requests (accelerator_count, training_gpus); 4 without GPUs")),
    Parameter("gpu_memory_request", help=_gpu(f"memory request and limit, e.g. '256Gi'; empty = {MEMORY_GI_PER_GPU}Gi "
                                              "per GPU the pod requests, 32Gi without; /dev/shm counts against it")),
)

BY_NAME: dict[str, Parameter] = {p.name: p for p in PARAMETERS}


def _split(target: str) -> tuple[type[BaseModel], list[str]]:
    config, *path = target.split(".")
    return CONFIGS[config], path


def field_info(target: str) -> FieldInfo:
    """The pydantic field a ``Config.field[.subfield]`` target names (KeyError when it names none)."""
    model, path = _split(target)
    for part in path[:-1]:
        model = model.model_fields[part].annotation  # a nested config, e.g. sampling: SamplingConfig
    return model.model_fields[path[-1]]


def field_default(target: str) -> Any:
    """The value a target's field has when the config is built without it (a nested field: its parent's default's)."""
    model, path = _split(target)
    value = model.model_fields[path[0]].get_default(call_default_factory=True)
    for part in path[1:]:
        value = getattr(value, part)
    return value


def pipeline_default(name: str) -> Any:
    """The default of a parameter that feeds a config: its home field's default, as the pipeline takes it (the
    stand-in for None). The pipeline's signature uses it; a test holds the two together."""
    parameter = BY_NAME[name]
    if not parameter.home:
        raise KeyError(f"{name} feeds no config field: the pipeline's signature holds its default")
    return parameter.to_pipeline(field_default(parameter.home))


def as_field_value(parameter: Parameter, value: Any, target: str | None = None) -> Any:
    """A pipeline value validated as its home field (or ``target``) takes it: e.g. train_launch {} -> LaunchConfig()."""
    return TypeAdapter(field_info(target or parameter.home).annotation).validate_python(parameter.to_config(value))


def pipeline_docstring(summary: str) -> str:
    """The pipeline function's docstring: kfp fills each parameter's description from its ``Args:`` section."""
    lines = [summary, "", "Args:"]
    lines += [f"    {p.name}: {p.description}" for p in PARAMETERS]
    return "\n".join(lines) + "\n"


def config_values(config: type[BaseModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``config`` that the pipeline values given (parameter name -> value) feed, nested where a
    parameter feeds a subfield (``{"sampling": {"temperature": ...}}``), with the stand-ins for None undone."""
    out: dict[str, Any] = {}
    for p in PARAMETERS:
        if p.name not in values:
            continue
        for target in p.feeds:
            model, path = _split(target)
            if model is not config:
                continue
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = p.to_config(values[p.name])
    return out


def fed_fields(config: type[BaseModel]) -> set[str]:
    """The top-level fields of ``config`` that some parameter feeds."""
    return {_split(target)[1][0] for p in PARAMETERS for target in p.feeds if _split(target)[0] is config}


def _arm_fields(config: type[BaseModel]) -> set[str]:
    return {_split(target)[1][0] for target in ARM_FIELDS if _split(target)[0] is config}


def train_options(train: TrainConfig) -> dict[str, Any]:
    """The TrainConfig fields that no parameter of their own carries and that differ from their defaults: the
    pipeline's ``train_options``."""
    skip, defaults = fed_fields(TrainConfig) | _arm_fields(TrainConfig), TrainConfig()
    options = {name: getattr(train, name) for name in TrainConfig.model_fields
               if name not in skip and getattr(train, name) != getattr(defaults, name)}
    # nested settings (lora) as plain values: a pipeline argument is JSON
    return {name: value.model_dump() if isinstance(value, BaseModel) else value for name, value in options.items()}


def arm_train_config(method: str, values: Mapping[str, Any]) -> TrainConfig:
    """One arm's TrainConfig from the pipeline values (parameter name -> value): the parameters that feed it,
    ``train_options`` for the other fields, and the arm's method."""
    options = dict(values.get("train_options") or {})
    taken = sorted(set(options) & (fed_fields(TrainConfig) | _arm_fields(TrainConfig)))
    if taken:
        raise ValueError(f"train_options sets {taken}: the pipeline sets those from its own parameters "
                         f"({', '.join(sorted(_feeders(TrainConfig, taken)))}) or per arm (method); set them there")
    fields = config_values(TrainConfig, values)
    if method == "opd" and fields.get("variant") == "decoupled":
        # `variant` chooses CaOPD's loss: decoupled trains the confidence tokens towards the replaced P, and plain
        # OPD has no P (TrainConfig refuses the pair). Refusing the run instead would forbid comparing a decoupled
        # CaOPD with its baseline, which is what train_baseline is for; so the baseline trains the paper's faithful
        # loss, as the parameter's description says, and the training component records it and says so in its log.
        fields["variant"] = "faithful"
    return TrainConfig(**options, **fields, method=method)


def _feeders(config: type[BaseModel], fields: Iterable[str]) -> set[str]:
    wanted = set(fields)
    return {p.name for p in PARAMETERS for target in p.feeds
            if _split(target)[0] is config and _split(target)[1][0] in wanted}


def run_arguments(run: Any) -> dict[str, Any]:
    """The pipeline arguments ``caopd run`` gives for a RunConfig (the others keep the pipeline's defaults)."""
    return {p.name: p.from_run(run) for p in PARAMETERS if p.run is not None}


def train_fields_set_by_the_run() -> dict[str, str]:
    """TrainConfig fields that a RunConfig's ``train`` cannot set, because the run sets them itself: dotted field
    path (``"k"``, ``"sampling.seed"``) -> what sets it instead (the run's own fields, or the arms)."""
    sources: dict[str, list[str]] = {name: ["the arm it trains (caopd; opd with train_baseline)"]
                                     for name in _arm_fields(TrainConfig)}
    for p in PARAMETERS:
        for target in p.feeds:
            model, path = _split(target)
            dotted = ".".join(path)
            if model is TrainConfig and p.run != f"train.{dotted}":
                source = f"`{p.run}`" if isinstance(p.run, str) else f"the pipeline parameter `{p.name}`"
                sources.setdefault(dotted, []).append(source)
    return {name: ", ".join(dict.fromkeys(found)) for name, found in sources.items()}
