"""opd-training: on-policy distillation of one arm (plain OPD or CaOPD) from its target records."""


from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output

from caopd.config.images import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def training_arms(train_baseline: bool) -> list[str]:
    """CaOPD, and plain OPD beside it when the baseline is on: the pipeline trains them in one ParallelFor."""
    return ["caopd", "opd"] if train_baseline else ["caopd"]


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def opd_training(records: Input[Dataset], preset: str, task: str, base_model: str, method: str, teacher_context: str,
                 divergence: str, beta: float, top_k: int, variant: str, teacher: str, teacher_model: str,
                 ema_rate: float, p_source: str, steps: int, prompts_per_step: int, k: int, lr: float,
                 precision: str, finetune: str, activation_checkpointing: bool,
                 train_temperature: float, train_top_p: float, train_max_new_tokens: int, seed: int,
                 train_options: dict, train_launch: dict, train_sharding: str, train_engine: str, thinking: str,
                 ask_confidence: bool, confidence_instruction: str, workspace_pvc: str, mlflow_settings: dict,
                 pipeline_run_id: str, model: Output[Model], training_report: Output[HTML]):
    # The inputs by name, before any other local exists. The pipeline passes each parameter under its own name, and
    # the one mapping (caopd.config.parameters) turns them into TrainConfig and TrainStageConfig: KFP needs the
    # signature above, and nothing else lists the fields again. A preset fills the parameters left at their defaults.
    from caopd.config.presets import with_preset

    inputs = with_preset(dict(locals()))

    import shutil
    from pathlib import Path

    from caopd.config.launch import WORKSPACE_MOUNT
    from caopd.config.parameters import arm_train_config, config_values
    from caopd.config.stages import CURVES, OPD_TRAINING, RECORDS, TrainStageConfig
    from caopd.evaluation.html import html_report
    from caopd.launch.remote import run_training_stage
    from caopd.tracking.stage_runs import tracked, tracker_if_configured
    from caopd.tracking.tracker import TAG_METHOD
    from caopd.training.checkpoints import checkpoint_root

    # train_options: any other TrainConfig field (warmup_steps, micro_batch_size, ...); validated with the rest.
    train = arm_train_config(method, inputs)
    if train.variant != inputs["variant"]:  # the baseline arm of a decoupled run: see arm_train_config
        print(f"opd-training ({method}): variant={inputs['variant']!r} is CaOPD's loss (it trains the confidence "
              f"towards P, which plain OPD has not); this arm trains variant={train.variant!r}")
    stage = config_values(TrainStageConfig, inputs)
    # train_launch: where training runs (torchrun over this pod's GPUs, or a TrainJob / PyTorchJob on several
    # nodes); a pipeline compiled with a workspace PVC mounts it here, and the checkpoints then outlive the pod.
    if workspace_pvc:
        stage["launch"] = {**stage["launch"], "workspace_pvc": workspace_pvc, "workspace": WORKSPACE_MOUNT}
    cfg = TrainStageConfig(**stage, records=str(Path(records.path) / RECORDS), train=train)
    tracker = tracker_if_configured(mlflow_settings, pipeline_run_id, Path(model.path).parent / "mlflow")
    summary = tracked(tracker, OPD_TRAINING.id, cfg,
                      lambda: run_training_stage(cfg, model.path, pipeline_run_id=pipeline_run_id), model.path,
                      inputs={"records": (cfg.records, "training")}, tags={TAG_METHOD: method})
    # Resume state only matters inside this task; the artifact store keeps the final model, not N copies of it.
    shutil.rmtree(checkpoint_root(model.path), ignore_errors=True)
    model.metadata.update({"method": method, "variant": train.variant, "steps": summary["steps"],
                           "model_digest": summary["model_digest"], "base_model": base_model})
    Path(training_report.path).write_text(html_report(f"{method} training: last step", [Path(model.path) / CURVES],
                                                      values=summary["final"]))
