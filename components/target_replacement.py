"""target-replacement: training records with the edited completions and the teacher's context."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from caopd.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def target_replacement(data: Input[Dataset], rollouts: Input[Dataset], preset: str, task: str, base_model: str,
                       method: str, teacher_context: str, thinking: str, ask_confidence: bool,
                       confidence_instruction: str, mlflow_settings: dict, pipeline_run_id: str,
                       records: Output[Dataset]):
    # The inputs by name: the one mapping builds the config (see rollout_estimation).
    inputs = dict(locals())
    from pathlib import Path

    from caopd.config.parameters import config_values
    from caopd.config.presets import with_preset
    from caopd.config.stages import ESTIMATES, ROLLOUTS, TARGET_REPLACEMENT, TRAIN, TargetsConfig
    from caopd.stages.targets import run_target_replacement
    from caopd.tracking.stage_runs import tracked, tracker_if_configured
    from caopd.tracking.tracker import TAG_METHOD

    cfg = TargetsConfig(**config_values(TargetsConfig, with_preset(inputs)), method=method,
                        data=str(Path(data.path) / TRAIN), rollouts=str(Path(rollouts.path) / ROLLOUTS),
                        estimates=str(Path(rollouts.path) / ESTIMATES))
    tracker = tracker_if_configured(mlflow_settings, pipeline_run_id, Path(records.path).parent / "mlflow")
    summary = tracked(tracker, TARGET_REPLACEMENT.id, cfg, lambda: run_target_replacement(cfg, records.path),
                      records.path, tags={TAG_METHOD: method})
    records.metadata.update({"method": method, "n_records": summary["n_records"],
                             "mean_target_confidence": summary["mean_target_confidence"]})
