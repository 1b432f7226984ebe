"""Launch a training job on the cluster with the kubernetes client, watch it, and fail with the job's own error.

A retried pipeline step finds the job it launched before (the name is stable): it adopts one that is still
running or has succeeded and replaces one that failed, which then resumes from the newest checkpoint in the shared
workspace. Status is polled rather than streamed: a poll survives an API server restart or an expired watch
without resource-version bookkeeping, and one GET every few seconds costs the API server nothing.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caopd.errors import CaopdServiceError, TrainingJobFailed
from caopd.launch.jobs import (
    PYTORCHJOB_CONTAINER,
    PYTORCHJOB_GROUP,
    PYTORCHJOB_PLURAL,
    PYTORCHJOB_VERSION,
    TRAINJOB_CONTAINER,
    TRAINJOB_GROUP,
    TRAINJOB_PLURAL,
    TRAINJOB_VERSION,
)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LOG_TAIL_LINES = 30
# torchrun's own report of a failed worker: the worker's exit code, then 40 lines of launcher traceback.
_TORCHRUN_FAILURE = re.compile(r"torch/distributed/elastic/.*failed \(exitcode: (-?\d+)\)")


@dataclass(frozen=True)
class JobRef:
    kind: str  # "TrainJob" or "PyTorchJob"
    namespace: str
    name: str

    @property
    def api(self) -> tuple[str, str, str]:
        if self.kind == "TrainJob":
            return TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL
        return PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL

    @property
    def pod_selector(self) -> str:
        # A TrainJob runs as a JobSet of the same name; the Training Operator labels a PyTorchJob's pods itself.
        if self.kind == "TrainJob":
            return f"jobset.sigs.k8s.io/jobset-name={self.name}"
        return f"training.kubeflow.org/job-name={self.name}"

    @property
    def container(self) -> str:
        return TRAINJOB_CONTAINER if self.kind == "TrainJob" else PYTORCHJOB_CONTAINER

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> JobRef:
        meta = manifest["metadata"]
        return cls(manifest["kind"], meta["namespace"], meta["name"])


def job_state(obj: dict[str, Any]) -> tuple[str, str]:
    """("succeeded" | "failed" | "running", the deciding condition's reason and message) from a job's status."""
    done = {"TrainJob": "Complete", "PyTorchJob": "Succeeded"}.get(obj.get("kind", ""), "Succeeded")
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        text = ": ".join(x for x in (condition.get("reason"), condition.get("message")) if x)
        if condition.get("type") == "Failed":
            return "failed", text or "the job failed"
        if condition.get("type") == done:
            return "succeeded", text
    return "running", ""


def trainer_error(log: str, exit_code: int, lines: int = LOG_TAIL_LINES) -> tuple[int, str]:
    """The training process's exit code and last lines, without torchrun's launcher traceback after them."""
    all_lines = log.rstrip().splitlines()
    for i, line in enumerate(all_lines):
        if match := _TORCHRUN_FAILURE.search(line):
            return int(match.group(1)), "\n".join(all_lines[:i][-lines:])
    return exit_code, "\n".join(all_lines[-lines:])


def launching_pod_owner() -> dict[str, Any] | None:
    """An owner reference to the KFP pod running this step (KFP injects its name and uid), so terminating the
    run garbage-collects the job and frees its GPUs."""
    name, uid = os.environ.get("KFP_POD_NAME"), os.environ.get("KFP_POD_UID")
    if not (name and uid):
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid, "blockOwnerDeletion": False}


class JobLauncher:
    """Creates, adopts, watches and deletes training jobs through the Kubernetes API."""

    def __init__(self, api_client: Any = None, namespace: str = "default") -> None:
        """``namespace``: where jobs go unless their config names one; without an ``api_client``, this pod's
        namespace (in a pipeline step) or the kubeconfig context's (in a shell)."""
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
                namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
            except config.ConfigException:  # a shell: $KUBECONFIG as it is now, not when kubernetes was imported
                kubeconfig = os.environ.get("KUBECONFIG") or None
                config.load_kube_config(config_file=kubeconfig)
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                namespace = (active.get("context") or {}).get("namespace") or "default"
            api_client = client.ApiClient()
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def _call(self, what: str, ref: JobRef, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as err:
            hint = {403: "the step's service account may not do this (the chart's RBAC grants it)",
                    404: f"is the {ref.kind} CRD installed (Kubeflow Trainer / Training Operator)?"}.get(err.status, "")
            raise CaopdServiceError(f"Kubernetes API: {what} {ref.kind} {ref.namespace}/{ref.name}: HTTP "
                                    f"{err.status} {err.reason}" + (f"; {hint}" if hint else "")) from None

    def get(self, ref: JobRef) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        group, version, plural = ref.api
        try:
            return self.custom.get_namespaced_custom_object(group, version, ref.namespace, plural, ref.name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise CaopdServiceError(f"Kubernetes API: get {ref.kind} {ref.namespace}/{ref.name}: HTTP "
                                    f"{err.status} {err.reason}") from None

    def submit(self, manifest: dict[str, Any], can_adopt: Callable[[], bool] = lambda: True) -> str:
        """Create the job, or adopt the one a previous try of this step left: 'created', 'adopted' or
        'replaced' (a failed one, or a finished one whose outputs ``can_adopt`` says are gone)."""
        ref = JobRef.of(manifest)
        existing = self.get(ref)
        outcome = "created"
        if existing is not None:
            state, _ = job_state(existing)
            if state == "running" or (state == "succeeded" and can_adopt()):
                self._add_owners(ref, existing, manifest["metadata"].get("ownerReferences") or [])
                return "adopted"
            self.delete(ref, wait=True)
            outcome = "replaced"
        group, version, plural = ref.api
        self._call("create", ref, self.custom.create_namespaced_custom_object, group, version, ref.namespace,
                   plural, manifest)
        return outcome

    def _add_owners(self, ref: JobRef, existing: dict[str, Any], owners: list[dict[str, Any]]) -> None:
        """The retry's pod joins the first try's as an owner: the job lives until both are gone."""
        current = existing["metadata"].get("ownerReferences") or []
        new = [o for o in owners if o["uid"] not in {c.get("uid") for c in current}]
        if new:
            group, version, plural = ref.api
            self._call("adopt", ref, self.custom.patch_namespaced_custom_object, group, version, ref.namespace,
                       plural, ref.name, {"metadata": {"ownerReferences": current + new}})

    def delete(self, ref: JobRef, wait: bool = False, timeout_s: float = 300.0) -> None:
        from kubernetes.client.exceptions import ApiException

        group, version, plural = ref.api
        try:  # foreground: the call returns once the job's pods are gone, so a new job starts from a clean slate
            self.custom.delete_namespaced_custom_object(group, version, ref.namespace, plural, ref.name,
                                                        propagation_policy="Foreground")
        except ApiException as err:
            if err.status != 404:
                raise CaopdServiceError(f"Kubernetes API: delete {ref.kind} {ref.namespace}/{ref.name}: HTTP "
                                        f"{err.status} {err.reason}") from None
        deadline = time.monotonic() + timeout_s
        while wait and self.get(ref) is not None:
            if time.monotonic() > deadline:
                raise CaopdServiceError(f"{ref.kind} {ref.namespace}/{ref.name} still exists {timeout_s:.0f} s "
                                        "after its deletion")
            time.sleep(1.0)

    def failed_pod_log(self, ref: JobRef, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the first failed trainer container (lowest pod name: node 0 / the master first)."""
        pods = self._call("list pods of", ref, self.core.list_namespaced_pod, ref.namespace,
                          label_selector=ref.pod_selector).items
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            for status in (pod.status.container_statuses or []) if pod.status else []:
                # The current state, or the last one of a container that has since been restarted.
                ended = [s.terminated for s in (status.state, status.last_state) if s is not None and s.terminated]
                if status.name == ref.container and any(t.exit_code for t in ended):
                    log = self._call("read the log of", ref, self.core.read_namespaced_pod_log, pod.metadata.name,
                                     ref.namespace, container=ref.container, tail_lines=lines + 60,
                                     previous=not (status.state and status.state.terminated))
                    code, text = trainer_error(log, next(t.exit_code for t in ended if t.exit_code), lines)
                    return f"pod {pod.metadata.name}: training exited with code {code}; its last lines:\n{text}"
        return "no failed trainer pod left to read a log from"

    def wait(self, ref: JobRef, timeout_s: float, poll_s: float,
             report: Callable[[str], None] = print, progress: Callable[[], str] = lambda: "") -> None:
        """Until the job succeeds; raises TrainingJobFailed with its condition and log when it fails, and deletes
        it when ``timeout_s`` passes."""
        deadline, last = time.monotonic() + timeout_s, None
        while True:
            obj = self.get(ref)
            if obj is None:
                raise TrainingJobFailed(f"{ref.kind} {ref.namespace}/{ref.name} disappeared while running (deleted "
                                        "by someone else?)")
            state, message = job_state(obj)
            line = f"{ref.kind} {ref.name}: {state}" + (f", {progress()}" if state == "running" else "")
            if line != last:
                report(line)
                last = line
            if state == "succeeded":
                return
            if state == "failed":
                raise TrainingJobFailed(f"{ref.kind} {ref.namespace}/{ref.name} failed: {message}\n"
                                        f"{self.failed_pod_log(ref)}")
            if time.monotonic() > deadline:
                self.delete(ref)
                raise TrainingJobFailed(f"{ref.kind} {ref.namespace}/{ref.name} did not finish within "
                                        f"{timeout_s:.0f} s; deleted it (its checkpoints stay in the workspace)")
            time.sleep(poll_s)
