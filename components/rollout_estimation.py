"""rollout-estimation (one shard) and its fan-out / fan-in helpers."""


from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from caopd.config.images import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def rollout_shard_indices(num_shards: int) -> list[int]:
    if num_shards < 1:
        raise ValueError(f"rollout_shards must be >= 1, got {num_shards}")
    return list(range(num_shards))


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def rollout_estimation(data: Input[Dataset], preset: str, task: str, base_model: str, k: int,
                       rollout_temperature: float, rollout_top_p: float, rollout_max_new_tokens: int, seed: int,
                       engine: str, shard_index: int, rollout_shards: int, thinking: str, ask_confidence: bool,
                       confidence_instruction: str, mlflow_settings: dict, pipeline_run_id: str,
                       rollouts: Output[Dataset]):
    # The inputs by name, before any other local exists: the one mapping (caopd.config.parameters) builds the
    # config from them, with the preset's values where a parameter was left at its default.
    inputs = dict(locals())
    from pathlib import Path

    from caopd.config.parameters import config_values
    from caopd.config.presets import with_preset
    from caopd.config.stages import ROLLOUT_ESTIMATION, TRAIN, RolloutConfig
    from caopd.stages.estimate import run_rollout_estimation
    from caopd.tracking.stage_runs import tracked, tracker_if_configured

    cfg = RolloutConfig(**config_values(RolloutConfig, with_preset(inputs)), data=str(Path(data.path) / TRAIN),
                        shard_index=shard_index)
    tracker = tracker_if_configured(mlflow_settings, pipeline_run_id, Path(rollouts.path).parent / "mlflow")
    summary = tracked(tracker, ROLLOUT_ESTIMATION.id, cfg, lambda: run_rollout_estimation(cfg, rollouts.path),
                      rollouts.path, inputs={"train": (cfg.data, "training")})
    rollouts.metadata.update({"n_prompts": summary["n_prompts"], "skipped_too_long": summary["skipped_too_long"]})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge_rollout_shards(shards: Input[list[Dataset]], rollouts: Output[Dataset], base_metrics: Output[Metrics]):
    from caopd.stages.estimate import merge_rollout_shards as merge

    summary = merge([shard.path for shard in shards], rollouts.path)
    rollouts.metadata.update({"n_prompts": summary["n_prompts"], "n_rollouts": summary["n_rollouts"],
                              "skipped_too_long": summary["skipped_too_long"]})
    for key, value in summary["base_metrics"].items():
        if value == value:  # NaN (AUROC with one class) is not a metric value KFP can show
            base_metrics.log_metric(f"base_rollouts_{key}", value)
