"""Where the training stage runs: this pod (under torchrun for several GPUs), or a TrainJob / PyTorchJob."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from caopd.config.images import GPU_IMAGE

WORKSPACE_MOUNT = "/mnt/caopd-workspace"  # where a pipeline compiled with a workspace PVC mounts it


DEFAULT_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")

# What a GPU pod needs beside each GPU it requests: CPUs for its worker process (tokenisation, data loading, vLLM's
# scheduler), host memory for the weights on their way to the card and the trainer's host state, and /dev/shm for
# NCCL and vLLM (a pod with 8 GPUs runs 8 workers: it needs 8 times as much).
CPU_PER_GPU, MEMORY_GI_PER_GPU, SHM_GI_PER_GPU = 8, 64, 16
# A pod of a GPU stage without GPUs: a training step that launches its job on other nodes, or a CPU-only cluster
# running the tiny model.
NO_GPU_SHAPE = ("4", "32Gi", "8Gi")


class PodShape(NamedTuple):
    cpu: str
    memory: str
    shm: str


def gpu_pod_shape(gpus: int, cpu: str = "", memory: str = "", shm: str = "") -> PodShape:
    """A GPU pod's CPU and memory (request and limit) and its /dev/shm: ``CPU_PER_GPU`` … per GPU, ``NO_GPU_SHAPE``
    without GPUs; a value given replaces its derived one (a Kubernetes quantity, else ValueError naming it)."""
    for name, value in (("cpu", cpu), ("memory", memory), ("shm", shm)):
        if value and not _QUANTITY.match(value):
            raise ValueError(f"{name} {value!r} is not a Kubernetes quantity such as '8', '500m' or '64Gi'")
    derived = (PodShape(*NO_GPU_SHAPE) if gpus < 1 else
               PodShape(str(CPU_PER_GPU * gpus), f"{MEMORY_GI_PER_GPU * gpus}Gi", f"{SHM_GI_PER_GPU * gpus}Gi"))
    return PodShape(cpu or derived.cpu, memory or derived.memory, shm or derived.shm)


_SECRET_REF = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-._a-zA-Z0-9]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_secret_env(secret_env: dict[str, str]) -> dict[str, str]:
    """Environment variables from Secrets, NAME → 'secret-name/key' (the training jobs' and the pipeline's pods)."""
    for name, ref in secret_env.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"secret_env: {name!r} is not an environment variable name")
        if not _SECRET_REF.match(ref):
            raise ValueError(f"secret_env[{name!r}] = {ref!r}: write it as 'secret-name/key'")
    return secret_env


def secret_ref(ref: str) -> tuple[str, str]:
    """'secret-name/key' (checked by check_secret_env) → (secret name, key)."""
    secret, key = ref.split("/", 1)
    return secret, key


class LaunchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "trainjob", "pytorchjob"] = Field(
        "local", description="local: train in this pod (under torchrun when procs_per_node > 1); trainjob: a "
        "Kubeflow Trainer TrainJob; pytorchjob: a Training Operator v1 PyTorchJob")
    namespace: str = Field("", description="namespace of the job; empty = this pod's own (in a shell: the "
                           "kubeconfig context's)")
    image: str = Field(GPU_IMAGE, description="image of the training nodes (the GPU image by default)")
    num_nodes: int = Field(1, ge=1, description="nodes (pods); torchrun joins them into one process group")
    procs_per_node: int = Field(1, ge=1, description="torchrun processes per node (or in this pod): one per GPU")
    gpus_per_node: int = Field(1, ge=0, description="GPUs each node requests (0: a CPU-only job, gloo)")
    accelerator: str = Field("nvidia.com/gpu", description="the extended resource that counts the GPUs")
    cpu: str = Field("", description="CPU request and limit per node, e.g. '64' or '7500m'; empty = "
                     f"{CPU_PER_GPU} per GPU of the node (gpus_per_node; {NO_GPU_SHAPE[0]} without)")
    memory: str = Field("", description="memory request and limit per node, e.g. '512Gi'; empty = "
                        f"{MEMORY_GI_PER_GPU}Gi per GPU of the node ({NO_GPU_SHAPE[1]} without)")
    shm_size: str = Field("", description="size of the memory-backed /dev/shm (NCCL and vLLM use it); empty = "
                          f"{SHM_GI_PER_GPU}Gi per GPU of the node ({NO_GPU_SHAPE[2]} without)")
    tolerations: list[dict[str, Any]] = Field(default_factory=lambda: [dict(t) for t in DEFAULT_TOLERATIONS],
                                              description="tolerations of the training pods")
    node_selector: dict[str, str] = Field(default_factory=dict, description="node selector of the training pods")
    runtime: str = Field("torch-distributed", description="TrainJob only: the ClusterTrainingRuntime to use")
    service_account: str = Field("", description="service account of the training pods; empty = the default")
    workspace_pvc: str = Field("", description="a ReadWriteMany PVC mounted on this pod and on every node; holds "
                               "the staged inputs, the checkpoints and the model")
    workspace: str = Field(WORKSPACE_MOUNT, description="where the workspace PVC is mounted, here and there")
    secret_env: dict[str, str] = Field(default_factory=dict, description="environment variables from Secrets, "
                                       "NAME: 'secret-name/key' (e.g. HF_TOKEN for gated hub models)")
    max_restarts: int = Field(3, ge=0, description="PyTorchJob: pod restarts before the job fails (each resumes "
                              "from the newest checkpoint); a TrainJob follows its runtime's failure policy")
    timeout_s: int = Field(7 * 24 * 3600, ge=60, description="give up (and delete the job) after this long")
    poll_s: float = Field(15.0, gt=0.0, le=600.0, description="seconds between two looks at the job's status")

    @field_validator("cpu", "memory", "shm_size")
    @classmethod
    def _quantity(cls, value: str) -> str:
        if value and not _QUANTITY.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes quantity such as '8', '500m' or '64Gi'")
        return value

    @field_validator("secret_env")
    @classmethod
    def _secret_refs(cls, value: dict[str, str]) -> dict[str, str]:
        return check_secret_env(value)

    @model_validator(mode="after")
    def _consistent(self) -> LaunchConfig:
        if self.kind == "local":
            return self
        if not self.workspace_pvc:
            raise ValueError(f"kind={self.kind!r} needs workspace_pvc: a ReadWriteMany PVC every node mounts (the "
                             "chart's workspace.enabled creates one; compile the pipeline with --workspace-pvc)")
        if not PurePosixPath(self.workspace).is_absolute():
            raise ValueError(f"workspace {self.workspace!r} must be an absolute path")
        if self.gpus_per_node and self.procs_per_node > self.gpus_per_node:
            raise ValueError(f"procs_per_node={self.procs_per_node} > gpus_per_node={self.gpus_per_node}: each "
                             "process needs its own GPU")
        return self

    def node_shape(self) -> PodShape:
        """Each node's CPU, memory and /dev/shm: the values given, else derived from ``gpus_per_node``."""
        return gpu_pod_shape(self.gpus_per_node, self.cpu, self.memory, self.shm_size)

