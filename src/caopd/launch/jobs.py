"""Where the training stage runs, and the TrainJob / PyTorchJob manifests that run it on several nodes.

Pure functions of a validated :class:`LaunchConfig`: the launcher (``caopd.launch.launcher``) only sends them.
Every node mounts the same shared workspace (a ReadWriteMany PVC): the training step stages the records and the
config there, every process writes its part of each checkpoint there (its shards under FSDP) and rank 0 the model,
and a pod restarted after preemption
resumes from the newest complete checkpoint it finds there.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from caopd.config.launch import LaunchConfig, secret_ref

TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
# The container that runs the trainer: "node" in Kubeflow Trainer's torch runtimes, "pytorch" in a PyTorchJob.
TRAINJOB_CONTAINER, PYTORCHJOB_CONTAINER = "node", "pytorch"
LABEL_MANAGED, LABEL_METHOD, LABEL_DIGEST = "app.kubernetes.io/managed-by", "caopd.dev/method", "caopd.dev/config"


def job_name(pipeline_run_id: str, method: str, config_digest: str) -> str:
    """Stable for one step of one pipeline run, so a retried step finds (and adopts) the job it launched."""
    suffix = hashlib.sha256(f"{pipeline_run_id}\0{config_digest}".encode()).hexdigest()[:10]
    return f"caopd-{re.sub(r'[^a-z0-9]+', '-', method.lower()).strip('-')[:20]}-{suffix}"


def torchrun_command(launch: LaunchConfig, config_file: str, out_dir: str) -> list[str]:
    """torchrun starts ``caopd train`` on each node. The node's rank reaches torchrun through PET_NODE_RANK, which
    both operators set; a TrainJob's runtime names the master in PET_MASTER_ADDR/PORT too, a PyTorchJob only in
    MASTER_ADDR/PORT, which Kubernetes expands into the arguments."""
    command = ["torchrun", f"--nnodes={launch.num_nodes}", f"--nproc-per-node={launch.procs_per_node}"]
    if launch.kind == "pytorchjob":
        command += ["--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
    return command + ["-m", "caopd.cli", "train", "--config", config_file, "--out", out_dir, "--quiet"]


def _env(launch: LaunchConfig) -> list[dict[str, Any]]:
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"},
           # One download of a hub model for every node, kept for the retries.
           {"name": "HF_HOME", "value": f"{launch.workspace}/hf-cache"},
           # The launching step logs the stage's MLflow run; a second one from the job's rank 0 would split it.
           {"name": "MLFLOW_TRACKING_URI", "value": ""}]
    for name, ref in sorted(launch.secret_env.items()):
        secret, key = secret_ref(ref)
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


def _resources(launch: LaunchConfig) -> dict[str, dict[str, Any]]:
    shape = launch.node_shape()
    requests: dict[str, Any] = {"cpu": shape.cpu, "memory": shape.memory}
    limits: dict[str, Any] = dict(requests)
    if launch.gpus_per_node:
        requests[launch.accelerator] = limits[launch.accelerator] = launch.gpus_per_node
    return {"requests": requests, "limits": limits}


def _volumes(launch: LaunchConfig) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "workspace", "persistentVolumeClaim": {"claimName": launch.workspace_pvc}},
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": launch.node_shape().shm}}]
    mounts = [{"name": "workspace", "mountPath": launch.workspace}, {"name": "dshm", "mountPath": "/dev/shm"}]
    return volumes, mounts


def _metadata(name: str, namespace: str, labels: dict[str, str],
              owner: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {LABEL_MANAGED: "caopd", **labels}}
    if owner:  # the launching pod: deleting the run's pods deletes the job and frees its GPUs
        meta["ownerReferences"] = [owner]
    return meta


def trainjob_manifest(name: str, namespace: str, launch: LaunchConfig, config_file: str, out_dir: str,
                      labels: dict[str, str], owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Kubeflow Trainer (v2) TrainJob on the torch runtime; pod settings go through podTemplateOverrides."""
    volumes, mounts = _volumes(launch)
    pod_spec: dict[str, Any] = {"tolerations": launch.tolerations, "volumes": volumes,
                                "containers": [{"name": TRAINJOB_CONTAINER, "volumeMounts": mounts}]}
    if launch.node_selector:
        pod_spec["nodeSelector"] = launch.node_selector
    if launch.service_account:
        pod_spec["serviceAccountName"] = launch.service_account
    return {
        "apiVersion": f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}", "kind": "TrainJob",
        "metadata": _metadata(name, namespace, labels, owner),
        "spec": {
            "runtimeRef": {"apiGroup": TRAINJOB_GROUP, "kind": "ClusterTrainingRuntime", "name": launch.runtime},
            "trainer": {"image": launch.image, "command": torchrun_command(launch, config_file, out_dir),
                        "numNodes": launch.num_nodes, "numProcPerNode": launch.procs_per_node,
                        "resourcesPerNode": _resources(launch), "env": _env(launch)},
            "podTemplateOverrides": [{"targetJobs": [{"name": "node"}], "spec": pod_spec}],
        },
    }


def pytorchjob_manifest(name: str, namespace: str, launch: LaunchConfig, config_file: str, out_dir: str,
                        labels: dict[str, str], owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Training Operator (v1) PyTorchJob: a Master and num_nodes − 1 Workers, each restarted on failure."""
    volumes, mounts = _volumes(launch)
    container = {"name": PYTORCHJOB_CONTAINER, "image": launch.image,
                 "command": torchrun_command(launch, config_file, out_dir), "env": _env(launch),
                 "resources": _resources(launch), "volumeMounts": mounts,
                 "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": volumes, "tolerations": launch.tolerations,
                                # the image's user; fsGroup lets it write the shared workspace
                                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000}}
    if launch.node_selector:
        pod_spec["nodeSelector"] = launch.node_selector
    if launch.service_account:
        pod_spec["serviceAccountName"] = launch.service_account

    def replicas(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "OnFailure", "template": {"spec": pod_spec}}

    specs = {"Master": replicas(1)}
    if launch.num_nodes > 1:
        specs["Worker"] = replicas(launch.num_nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}", "kind": "PyTorchJob",
        "metadata": _metadata(name, namespace, labels, owner),
        "spec": {"nprocPerNode": str(launch.procs_per_node), "pytorchReplicaSpecs": specs,
                 "runPolicy": {"backoffLimit": launch.max_restarts, "cleanPodPolicy": "None"}},
    }


def job_manifest(name: str, namespace: str, launch: LaunchConfig, config_file: str, out_dir: str,
                 labels: dict[str, str], owner: dict[str, Any] | None = None) -> dict[str, Any]:
    build = {"trainjob": trainjob_manifest, "pytorchjob": pytorchjob_manifest}.get(launch.kind)
    if build is None:
        raise ValueError(f"kind={launch.kind!r} trains in this pod: there is no job to launch")
    return build(name, namespace, launch, config_file, out_dir, labels, owner)
