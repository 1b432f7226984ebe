"""The CaOPD pipeline: one DAG for a Kubeflow cluster (GPU pods) and for a laptop (``kfp.local``).

data-preparation → rollout-estimation (ParallelFor over shards) → merge-rollout-shards →
target-replacement → opd-training (ParallelFor over the arms: CaOPD, and plain OPD as the optional baseline) →
calibration-evaluation → model-registration (never cached). With ``continual_kinds`` (task B), each arm then
continues on task B from its model and is scored on task A before and after (the calibration-forgetting check).

Parameters are ordered by stage; their defaults run the tiny default model end to end. Each one's description (in
the compiled spec, shown by the Kubeflow UI's Create-run form) comes from the one mapping between the configs and
the parameters, ``caopd.config.parameters``, through the generated docstring's ``Args:``. The GPU stages
(rollouts, training, evaluation) take their accelerator, node selector and tolerations from parameters, so one
compiled spec serves every cluster; the CPU stages never request a GPU. ``build_pipeline(workspace_pvc=...)``
mounts a shared ReadWriteMany volume on the training step: its checkpoints then outlive the pod, and
``train_launch`` may start TrainJobs / PyTorchJobs that read and write the same volume. Every task that logs to
MLflow gets the variables of ``secret_env`` from their Secrets (by default the pipeline identity's
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` from the Secret the chart names), optionally: a cluster
without that Secret runs the tasks unauthenticated.
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Model

from caopd.components import (
    calibration_evaluation,
    continual_distillation,
    continual_enabled,
    continual_evaluation,
    data_preparation,
    gpu_pod_shape,
    merge_rollout_shards,
    model_registration,
    opd_training,
    rollout_estimation,
    rollout_shard_indices,
    target_replacement,
    training_arms,
)
from caopd.config.images import IMAGE_CACHE_DIR
from caopd.config.launch import WORKSPACE_MOUNT, check_secret_env, secret_ref
from caopd.config.parameters import pipeline_default as _DEFAULT
from caopd.config.parameters import pipeline_docstring
from caopd.config.stages import DataConfig, RegisterConfig, TrainStageConfig
from caopd.config.tracking import PIPELINE_SECRET_ENV
from caopd.config.training import TrainConfig

PIPELINE_NAME = "caopd"
CPU_STAGE_CPU, CPU_STAGE_MEMORY = "1", "4Gi"
# Defaults come from the stages' own configs: one home for each.
_DATA, _TRAIN = DataConfig(), TrainConfig()
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _on_gpu(task: dsl.PipelineTask, accelerator_type, accelerator_count, node_selector, tolerations,
            shape: dsl.PipelineTask) -> dsl.PipelineTask:
    """A GPU stage's pod: ``accelerator_count`` GPUs, and the CPU and memory that ``shape`` (a ``gpu_pod_shape``
    task of the same count) derived from it."""
    cpu, memory = shape.outputs["cpu"], shape.outputs["memory"]
    task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    # Resource settings do not register their parameters as task inputs (kfp 2.17), so inside a ParallelFor or
    # an If the sub-DAG never receives them and the run fails with "parent pipeline input argument not found".
    # kfp-kubernetes registers its own parameters this same way.
    task.register_pipeline_channels([accelerator_type, accelerator_count, cpu, memory])
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    # /dev/shm: NCCL and vLLM exchange tensors through it and the 64 MiB container default breaks both. Without a
    # size limit of its own, what it holds counts against the pod's memory limit, which grows with its GPUs.
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    # The downloads (a base model from s3:// or the registry, hub models) on a volume of their own rather than the
    # container's writable layer; it lives as long as the pod.
    kubernetes.empty_dir_mount(task, volume_name="cache", mount_path=IMAGE_CACHE_DIR)
    return task


def _on_cpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_cpu_request(CPU_STAGE_CPU).set_memory_request(CPU_STAGE_MEMORY)


def _with_secrets(task: dsl.PipelineTask, secret_env: dict[str, str]) -> dsl.PipelineTask:
    """Environment variables from Secrets (NAME → 'secret/key'), one reference per Secret; optional, so that a
    pod starts where the Secret does not exist (its variables are then unset)."""
    by_secret: dict[str, dict[str, str]] = {}
    for name, ref in sorted(secret_env.items()):
        secret, key = secret_ref(ref)
        by_secret.setdefault(secret, {})[key] = name
    for secret, key_to_env in by_secret.items():
        kubernetes.use_secret_as_env(task, secret, key_to_env, optional=True)
    return task


def _by_name(component, parameters: dict, **given) -> dsl.PipelineTask:
    """A task of ``component``: the inputs ``given``, and every other input from the pipeline parameter of the same
    name. The stages build their configs from their inputs through the one mapping (caopd.config.parameters), so
    neither the pipeline nor the component lists a config's fields again."""
    names = component.component_spec.inputs or {}
    return component(**{name: parameters[name] for name in names if name in parameters and name not in given},
                     **given)


class Outputs(NamedTuple):
    """The pipeline's outputs (kfp reads the class's fields and their annotations, as from NamedTuple(...))."""

    evaluation: Dataset
    registered: Model


DESCRIPTION = ("Calibration-Aware On-Policy Distillation: rollouts estimate each prompt's success rate P, training "
               "distils towards 'Confidence: P', evaluation compares base, plain OPD and CaOPD, and the CaOPD model is "
               "registered.")


def build_pipeline(workspace_pvc: str = "", secret_env: dict[str, str] | None = None):
    """The pipeline; with ``workspace_pvc`` (a PVC's name: fixed at compile time, since a volume is part of the pod
    spec, not a run parameter) the training step mounts it at WORKSPACE_MOUNT. ``secret_env`` (NAME →
    'secret/key', default PIPELINE_SECRET_ENV) reaches every task that logs to MLflow: credentials are part of the
    pod spec, never a run parameter."""
    secret_env = check_secret_env(dict(PIPELINE_SECRET_ENV if secret_env is None else secret_env))

    def caopd_pipeline(
        preset: str = "",
        # 0 · data preparation
        task: str = _DEFAULT("task"),
        train_source: str = "",
        eval_source: str = "",
        n_train: int = _DATA.n_train,
        n_eval: int = _DATA.n_eval,
        kind_weights: dict = _DATA.kind_weights,
        ood_kinds: list = _DATA.ood_kinds,
        ood_source: str = "",
        ood_task: str = "",
        continual_kinds: list = _DATA.continual_kinds,
        seed: int = 0,
        # how prompts reach the model
        thinking: str = _DEFAULT("thinking"),
        ask_confidence: bool = _DEFAULT("ask_confidence"),
        confidence_instruction: str = _DEFAULT("confidence_instruction"),
        # 1 · rollout estimation
        base_model: str = "tiny",
        k: int = _TRAIN.k,
        rollout_temperature: float = _DEFAULT("rollout_temperature"),
        rollout_top_p: float = _DEFAULT("rollout_top_p"),
        rollout_max_new_tokens: int = _DEFAULT("rollout_max_new_tokens"),
        rollout_shards: int = 1,
        engine: str = "auto",
        # 2 · target replacement
        teacher_context: str = _TRAIN.teacher_context,
        # 3 · OPD training
        train_baseline: bool = True,
        divergence: str = _TRAIN.divergence,
        beta: float = _TRAIN.beta,
        top_k: int = 0,
        variant: str = _TRAIN.variant,
        teacher: str = _TRAIN.teacher,
        teacher_model: str = "",
        ema_rate: float = _TRAIN.ema_rate,
        p_source: str = _TRAIN.p_source,
        steps: int = _TRAIN.steps,
        prompts_per_step: int = _TRAIN.prompts_per_step,
        lr: float = _TRAIN.lr,
        precision: str = _TRAIN.precision,
        finetune: str = _TRAIN.finetune,
        activation_checkpointing: bool = _TRAIN.activation_checkpointing,
        train_temperature: float = _DEFAULT("train_temperature"),
        train_top_p: float = _DEFAULT("train_top_p"),
        train_max_new_tokens: int = _DEFAULT("train_max_new_tokens"),
        train_options: dict = {},
        # where training runs: {} = in the training pod; {"procs_per_node": 4} = torchrun over its 4 GPUs;
        # {"kind": "trainjob" | "pytorchjob", "num_nodes": ..., ...} = a job on several nodes (caopd.config.launch.
        # LaunchConfig; needs a pipeline compiled with a workspace PVC)
        train_launch: dict = {},
        # with several processes: "replicate" (data parallel) or "fsdp" (weights, gradients and optimizer state
        # sharded between steps, for models whose training state does not fit one GPU)
        train_sharding: str = TrainStageConfig.model_fields["sharding"].default,
        # training rollouts: "transformers" (from the live student) or "vllm" (colocated, synced every step)
        train_engine: str = TrainStageConfig.model_fields["engine"].default,
        training_gpus: int = 1,
        # 4 · calibration evaluation
        eval_temperature: float = _DEFAULT("eval_temperature"),
        eval_top_p: float = _DEFAULT("eval_top_p"),
        eval_max_new_tokens: int = _DEFAULT("eval_max_new_tokens"),
        eval_seed: int = 1,
        # 5 · model registration
        model_name: str = RegisterConfig.model_fields["name"].default,
        promotion_gates: dict = {},
        # MLflow, for every stage: {"tracking_uri": ..., "experiment": ..., "artifact_root": "s3://..."}; empty =
        # $MLFLOW_TRACKING_URI when the cluster injects it, else no tracking and a registry kept in the artifact store
        mlflow_settings: dict = {},
        # GPU pods (rollout estimation, training, evaluation)
        accelerator_type: str = "nvidia.com/gpu",
        accelerator_count: int = 1,
        gpu_node_selector: dict = {},
        gpu_tolerations: list = DEFAULT_GPU_TOLERATIONS,
        gpu_cpu_request: str = "",
        gpu_memory_request: str = "",
    ) -> Outputs:
        parameters = dict(locals())  # name -> channel, before any other local exists

        # The pods' CPU and memory grow with their GPU count: the training pods' (training_gpus) and the others'.
        gpu_shape = _on_cpu(gpu_pod_shape(gpus=accelerator_count, cpu=gpu_cpu_request, memory=gpu_memory_request))
        training_shape = _on_cpu(gpu_pod_shape(gpus=training_gpus, cpu=gpu_cpu_request, memory=gpu_memory_request))

        def gpu(t: dsl.PipelineTask, shape: dsl.PipelineTask = gpu_shape) -> dsl.PipelineTask:
            return _on_gpu(t, accelerator_type, accelerator_count, gpu_node_selector, gpu_tolerations, shape)

        tracking = dict(mlflow_settings=mlflow_settings, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        def tracked(t: dsl.PipelineTask) -> dsl.PipelineTask:  # a task that logs to MLflow: its credentials
            return _with_secrets(t, secret_env)

        data = tracked(_on_cpu(_by_name(data_preparation, parameters, **tracking)))
        data.set_retry(2)

        shards = _on_cpu(rollout_shard_indices(num_shards=rollout_shards))
        with dsl.ParallelFor(shards.output, name="rollout-shards") as shard_index:
            shard = tracked(gpu(_by_name(rollout_estimation, parameters, data=data.outputs["data"],
                                         shard_index=shard_index, **tracking)))
            shard.set_retry(2, backoff_duration="60s")
        merged = _on_cpu(merge_rollout_shards(shards=dsl.Collected(shard.outputs["rollouts"])))
        merged.set_retry(2)

        # The arms train side by side (one GPU pod each on a cluster) from the same rollouts.
        arms = _on_cpu(training_arms(train_baseline=train_baseline))
        continual = _on_cpu(continual_enabled(continual_kinds=continual_kinds))
        with dsl.ParallelFor(arms.output, name="arms") as method:
            targets = tracked(_on_cpu(_by_name(target_replacement, parameters, data=data.outputs["data"],
                                               rollouts=merged.outputs["rollouts"], method=method, **tracking)))
            targets.set_retry(2)
            trained = tracked(gpu(_by_name(opd_training, parameters, records=targets.outputs["records"],
                                           method=method, workspace_pvc=workspace_pvc, **tracking), training_shape))
            # Its own GPU count: 0 when the step only launches and watches a job on other nodes.
            trained.set_accelerator_limit(training_gpus)
            trained.register_pipeline_channels([training_gpus])
            if workspace_pvc:
                kubernetes.mount_pvc(trained, pvc_name=workspace_pvc, mount_path=WORKSPACE_MOUNT)
            # Deterministic from its inputs, so a retry after a lost node repeats the same run.
            trained.set_retry(1)
            # Nothing outside this branch reads its outputs: a skipped branch must leave no dangling input behind.
            with dsl.If(continual.output == True, name="continual"):  # noqa: E712 (a KFP condition, not Python's)
                on_b = tracked(gpu(continual_distillation(data=data.outputs["data"], model=trained.outputs["model"],
                                                          task=task, engine=engine, **tracking)))
                on_b.set_retry(1)
                forgetting = tracked(gpu(_by_name(continual_evaluation, parameters, data=data.outputs["data"],
                                                  model=trained.outputs["model"],
                                                  continual_model=on_b.outputs["continual_model"], **tracking)))
                forgetting.set_retry(2)

        # Each consumer of the arms' models gets its own Collected: kfp 2.17 fails to compile a shared one.
        evaluation = tracked(gpu(_by_name(calibration_evaluation, parameters, data=data.outputs["data"],
                                          models=dsl.Collected(trained.outputs["model"]), **tracking)))
        evaluation.set_retry(2)

        registration = tracked(_on_cpu(model_registration(
            models=dsl.Collected(trained.outputs["model"]), evaluation=evaluation.outputs["evaluation"],
            model_name=model_name, base_model=base_model, promotion_gates=promotion_gates, **tracking)))
        # A registry write is a side effect: a cached "success" would skip it without registering anything.
        registration.set_caching_options(False)
        return Outputs(evaluation=evaluation.outputs["evaluation"], registered=registration.outputs["registered"])

    # kfp fills each parameter's description from the docstring's Args: set it before the decorator reads it.
    caopd_pipeline.__doc__ = pipeline_docstring("The CaOPD pipeline.")
    return dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(caopd_pipeline)


caopd_pipeline = build_pipeline()
