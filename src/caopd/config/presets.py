"""The paper's recipes as presets: every hyperparameter as the official scripts set it, by pipeline parameter name.

A preset is a set of pipeline values (``caopd.config.parameters``), plus TrainConfig fields that travel in
``train_options``. It is a starting point, never a lock:

* on the command line (``--preset`` on ``caopd run`` and the stage commands) every flag and ``--config`` value wins:
  a run config resolves its preset when it is built, and hands the pipeline the resolved values;
* in the pipeline (the ``preset`` parameter) a parameter left at its default takes the preset's value, and any other
  value wins; ``train_options`` given in the run win key by key.

Where a value of the user replaces the preset's, a preset setting that would contradict it steps aside: an explicit
``steps`` replaces the preset's ``epochs``, an explicit ``warmup_steps`` its ``warmup_ratio``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from caopd.config.parameters import BY_NAME, config_values, pipeline_default
from caopd.config.training import TrainConfig

# A preset's training-length and warm-up settings give way to the user's: preset key -> the user's key that wins.
YIELDS_TO = {"epochs": "steps", "warmup_ratio": "warmup_steps"}

_OFFICIAL = "official scripts (SalesforceAIResearch/CaOPD)"


@dataclass(frozen=True)
class Preset:
    """``values``: pipeline parameter -> value; ``train_options``: TrainConfig fields with no parameter of their own;
    ``sources``: where each value comes from (the docs' table)."""

    name: str
    summary: str
    values: Mapping[str, Any]
    train_options: Mapping[str, Any] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)


def _paper(task: str, eval_max_new_tokens: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    values = {
        "task": task,
        "k": 8, "rollout_temperature": 1.0, "rollout_top_p": 1.0, "rollout_max_new_tokens": 1024,
        "teacher_context": "demo", "divergence": "forward_kl", "top_k": 0, "variant": "faithful",
        "teacher": "ema", "ema_rate": 0.01, "p_source": "online", "prompts_per_step": 4, "lr": 2e-5,
        "precision": "bf16",
        "train_temperature": 1.0, "train_top_p": 1.0, "train_max_new_tokens": 1024,
        "eval_temperature": 0.0, "eval_top_p": 1.0, "eval_max_new_tokens": eval_max_new_tokens,
    }
    train_options = {"lr_schedule": "cosine", "warmup_ratio": 0.1, "epochs": 1.0, "loss_normalization": "sequence",
                     "skip_first_tokens": 3, "max_prompt_tokens": 1024, "max_grad_norm": 1.0}
    sources = {
        "task": "the paper's tool-use (ToolAlpaca) and science (SciKnowEval chemistry) setups",
        "k": f"{_OFFICIAL}: 8 rollouts per prompt",
        "rollout_temperature": f"{_OFFICIAL}: sampling at temperature 1.0, top-p 1.0",
        "rollout_top_p": f"{_OFFICIAL}: top-p 1.0",
        "rollout_max_new_tokens": f"{_OFFICIAL}: max completion length 1024",
        "teacher_context": "the paper: the gold demonstration in the teacher's context (SDFT-style)",
        "divergence": f"{_OFFICIAL}: forward KL",
        "top_k": f"{_OFFICIAL}: the full vocabulary",
        "variant": "the paper: one divergence over the whole edited completion",
        "teacher": f"{_OFFICIAL}: the teacher is an EMA of the student",
        "ema_rate": f"{_OFFICIAL}: 0.99·teacher + 0.01·student after every optimizer step",
        "p_source": "the paper: P re-estimated from each step's own K rollouts",
        "prompts_per_step": f"{_OFFICIAL}: 32 completions (4 prompts × 8) per optimizer step",
        "lr": f"{_OFFICIAL}: 2e-5 (the README: 1e-5 or 2e-5)",
        "precision": f"{_OFFICIAL}: bf16",
        "train_temperature": f"{_OFFICIAL}: on-policy samples at temperature 1.0",
        "train_top_p": f"{_OFFICIAL}: top-p 1.0",
        "train_max_new_tokens": f"{_OFFICIAL}: max completion length 1024",
        "eval_temperature": f"{_OFFICIAL} (evaluation): greedy decoding",
        "eval_top_p": f"{_OFFICIAL} (evaluation): greedy decoding",
        "eval_max_new_tokens": f"{_OFFICIAL} (evaluation): 1024 new tokens for tool use, 2048 for science",
        "lr_schedule": f"{_OFFICIAL}: cosine schedule",
        "warmup_ratio": f"{_OFFICIAL}: warm-up ratio 0.1",
        "epochs": f"{_OFFICIAL}: 1 epoch",
        "loss_normalization": f"{_OFFICIAL}: per-sequence token mean, then the mean over sequences",
        "skip_first_tokens": f"{_OFFICIAL}: the first 3 completion tokens are left out of the loss",
        "max_prompt_tokens": f"{_OFFICIAL}: prompts left-truncated to 1024 tokens",
        "max_grad_norm": f"{_OFFICIAL}: gradient clipping at 1.0",
    }
    return values, train_options, sources


PRESETS: dict[str, Preset] = {
    name: Preset(name, summary, *_paper(task, eval_tokens))
    for name, summary, task, eval_tokens in (
        ("paper-tooluse", "the paper's tool-use recipe (ToolAlpaca prompts; greedy evaluation, 1024 new tokens)",
         "tooluse", 1024),
        ("paper-science", "the paper's science recipe (multiple-choice chemistry; greedy evaluation, 2048 new tokens)",
         "mcq", 2048),
    )
}


def get_preset(name: str) -> Preset | None:
    """The preset of that name; None for "" (no preset)."""
    if not name:
        return None
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)} (or empty for none)")
    return PRESETS[name]


def with_preset(values: Mapping[str, Any]) -> dict[str, Any]:
    """Pipeline values (parameter -> value) with the preset ``values["preset"]`` filled in: a parameter at its
    default takes the preset's value; ``train_options`` merge key by key, the run's own winning."""
    preset = get_preset(values.get("preset") or "")
    out = dict(values)
    if preset is None:
        return out
    for name, value in preset.values.items():
        if name in out and out[name] == pipeline_default(name):
            out[name] = value
    given = dict(values.get("train_options") or {})
    explicit = set(given) | {n for n in ("steps", "warmup_steps") if n in values and values[n] != pipeline_default(n)}
    options = {k: v for k, v in preset.train_options.items() if YIELDS_TO.get(k) not in explicit}
    out["train_options"] = {**options, **given}
    return out


def preset_config(name: str, config: type[BaseModel]) -> dict[str, Any]:
    """A stage config's values under a preset (nested dicts, as ``--config`` files spell them): the start that the
    command line's own values then override (``merge_over_preset``)."""
    preset = get_preset(name)
    if preset is None:
        return {}
    out = config_values(config, preset.values)
    train = {**config_values(TrainConfig, preset.values), **preset.train_options}
    if config is TrainConfig:
        out.update(train)
    elif "train" in config.model_fields and config.model_fields["train"].annotation is TrainConfig:
        out["train"] = train
    return out


def preset_run_values(name: str) -> dict[str, Any]:
    """A preset as ``caopd run``'s config spells it (nested dicts: ``{"rollout": {"temperature": 1.0}, "train":
    {...}}``), through each parameter's path into the run config: the start that the values given override."""
    preset = get_preset(name)
    if preset is None:
        return {}
    out: dict[str, Any] = {}
    settings = [(BY_NAME[key].run, BY_NAME[key].to_config(value)) for key, value in preset.values.items()]
    settings += [(f"train.{key}", value) for key, value in preset.train_options.items()]
    for path, value in settings:
        node = out
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def merge_over_preset(preset: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` (from ``--config`` and flags) over a preset's config values, nested dicts merged key by key; a preset
    setting yields to the user's value it would contradict (``YIELDS_TO``)."""
    out = copy.deepcopy(dict(preset))
    for key, value in given.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_over_preset(out[key], value)
        else:
            out[key] = value
    for preset_key, user_key in YIELDS_TO.items():
        if user_key in given and preset_key in out and preset_key not in given:
            del out[preset_key]
    return out


def check_pipeline_values(values: Mapping[str, Any]) -> dict[str, BaseModel]:
    """Every stage config the pipeline would build from these values (parameter -> value, the pipeline's defaults
    filled in by the caller), the preset applied: a setting no stage accepts fails here, in seconds, before the
    first task starts. Artifact paths the pipeline fills in at run time stand in as placeholders."""
    from caopd.config.parameters import arm_train_config
    from caopd.config.stages import DataConfig, EvaluateConfig, RolloutConfig, TargetsConfig, TrainStageConfig

    values = with_preset(values)
    arms = ("caopd", "opd") if values.get("train_baseline", True) else ("caopd",)
    configs: dict[str, BaseModel] = {
        "data": DataConfig(**config_values(DataConfig, values)),
        "rollout": RolloutConfig(**config_values(RolloutConfig, values), data="<train>"),
        "evaluation": EvaluateConfig(**config_values(EvaluateConfig, values), models={"base": "<base>"},
                                     data="<eval>"),
    }
    for arm in arms:
        configs[f"targets_{arm}"] = TargetsConfig(**config_values(TargetsConfig, values), method=arm, data="<train>",
                                                  rollouts="<rollouts>", estimates="<estimates>")
        configs[f"train_{arm}"] = TrainStageConfig(**config_values(TrainStageConfig, values), records="<records>",
                                                   train=arm_train_config(arm, values))
    return configs
