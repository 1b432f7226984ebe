"""A stand-in for the Kubernetes API on 127.0.0.1 with a Training Operator and a Kubeflow Trainer inside (no API
server, kind or envtest installs here).

It stores TrainJobs and PyTorchJobs as the API server would (create, get, merge-patch, delete; 409 on a
duplicate, 404 when missing) and, unless told to ``hold`` them, runs each job for real: one local process per node
from the manifest's command, with the environment each operator gives its pods (PET_* for torchrun, MASTER_ADDR /
MASTER_PORT, RANK) and the kubelet's ``$(VAR)`` expansion, on 127.0.0.1. It then sets the job's conditions as the
operators do and serves the pods and their logs. Secrets referenced by the job come from ``secrets``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from servers import InProcessHTTP, QuietHandler

_CUSTOM = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                     r"(?:/(?P<name>[^/]+))?$")
_PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+)/log)?$")
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion of command and args (unknown names stay as written)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


class FakeKubernetes(InProcessHTTP):
    def __init__(self, log_dir: Path, secrets: dict[str, dict[str, str]] | None = None) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.pods: dict[tuple[str, str], dict] = {}  # (namespace, pod name) -> {"labels", "container", ...}
        self.requests: list[tuple[str, str]] = []
        self.secrets = secrets or {}
        self.crds = {"trainjobs", "pytorchjobs"}  # the job kinds whose operators are installed
        self.hold = False  # True: jobs stay "running" (nothing executes) until the test sets their status
        self.node_envs: list[dict[str, str]] = []  # the environment each node process started with
        self._log_dir = log_dir
        self._procs: dict[tuple[str, str], list[subprocess.Popen]] = {}
        self._lock = threading.Lock()
        super().__init__()

    def __exit__(self, *exc) -> None:
        for procs in self._procs.values():
            for p in procs:
                p.kill()
        super().__exit__(*exc)

    def api_client(self):
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        return client.ApiClient(config)

    # -- the operators ---------------------------------------------------------------------------------------
    def _node_specs(self, obj: dict) -> tuple[str, list[tuple[str, str, dict, list[dict]]]]:
        """(container name, [(pod name, node rank, container spec, env)]) as each operator lays the job out."""
        name, spec = obj["metadata"]["name"], obj["spec"]
        if obj["kind"] == "TrainJob":
            trainer, nodes = spec["trainer"], spec["trainer"]["numNodes"]
            master = {"PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port()),
                      "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"])}
            return "node", [(f"{name}-node-0-{r}", str(r), {"command": trainer["command"], "env": trainer["env"]},
                             {**master, "PET_NODE_RANK": str(r)}) for r in range(nodes)]
        replicas = spec["pytorchReplicaSpecs"]
        layout = [("master", 0)] + [("worker", i) for i in range(replicas.get("Worker", {}).get("replicas", 0))]
        nodes = len(layout)
        master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PET_NNODES": str(nodes),
                  "PET_NPROC_PER_NODE": spec.get("nprocPerNode", "1"), "WORLD_SIZE": str(nodes)}
        out = []
        for rank, (rtype, index) in enumerate(layout):
            container = replicas["Master" if rtype == "master" else "Worker"]["template"]["spec"]["containers"][0]
            out.append((f"{name}-{rtype}-{index}", str(rank), container,
                        {**master, "RANK": str(rank), "PET_NODE_RANK": str(rank)}))
        return "pytorch", out

    def _env(self, container: dict, injected: dict[str, str]) -> dict[str, str]:
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1"}
        for var in container.get("env", []):
            if "valueFrom" in var:
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
            else:
                env[var["name"]] = var["value"]
        return {**env, **injected}

    def _run(self, key: tuple[str, str, str]) -> None:
        obj = self.objects[key]
        container_name, nodes = self._node_specs(obj)
        selector = ("jobset.sigs.k8s.io/jobset-name" if obj["kind"] == "TrainJob"
                    else "training.kubeflow.org/job-name")
        procs = []
        for pod_name, _, container, injected in nodes:
            env = self._env(container, injected)
            self.node_envs.append(env)
            argv = [expand(part, env) for part in container["command"] + container.get("args", [])]
            log = self._log_dir / f"{pod_name}.log"
            with log.open("wb") as handle:
                procs.append(subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT))
            self.pods[(key[1], pod_name)] = {"labels": {selector: key[2]}, "container": container_name,
                                             "log": log, "exit_code": None}
        self._procs[key[1:]] = procs
        codes = [p.wait() for p in procs]
        for (pod_name, *_), code in zip(nodes, codes):
            self.pods[(key[1], pod_name)]["exit_code"] = code
        with self._lock:
            if key not in self.objects:  # deleted meanwhile
                return
            if all(c == 0 for c in codes):
                done = "Complete" if obj["kind"] == "TrainJob" else "Succeeded"
                self.set_condition(key, done, "JobsCompleted", "all nodes finished")
            else:
                self.set_condition(key, "Failed", "BackoffLimitExceeded",
                                   f"node exited with code {next(c for c in codes if c)}")

    def set_condition(self, key: tuple[str, str, str], kind: str, reason: str, message: str) -> None:
        status = self.objects[key].setdefault("status", {})
        status["conditions"] = [{"type": kind, "status": "True", "reason": reason, "message": message}]

    # -- HTTP ------------------------------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(QuietHandler):
            def _status(self, code: int, reason: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                                  "reason": reason, "message": reason})

            def _body(self) -> dict:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                fake.requests.append((method, url.path))
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if m := _PODS.match(url.path):
                    return self._pods(m, query)
                m = _CUSTOM.match(url.path)
                if not m or m.group("plural") not in fake.crds:
                    return self._status(404, "NotFound")
                ns, plural, name = m.group("ns"), m.group("plural"), m.group("name")
                if method == "POST" and name is None:
                    obj = self._body()
                    key = (plural, ns, obj["metadata"]["name"])
                    with fake._lock:
                        if key in fake.objects:
                            return self._status(409, "AlreadyExists")
                        obj["metadata"].setdefault("uid", f"uid-{len(fake.requests)}")
                        fake.objects[key] = obj
                    if not fake.hold:
                        threading.Thread(target=fake._run, args=(key,), daemon=True).start()
                    return self._send(201, obj)
                key = (plural, ns, name)
                with fake._lock:
                    obj = fake.objects.get(key)
                    if obj is None:
                        return self._status(404, "NotFound")
                    if method == "GET":
                        return self._send(200, obj)
                    if method == "PATCH":
                        patch = self._body()
                        obj["metadata"].update(patch.get("metadata", {}))
                        return self._send(200, obj)
                    if method == "DELETE":
                        del fake.objects[key]
                        for p in fake._procs.pop((ns, name), []):
                            p.kill()
                        return self._send(200, {"kind": "Status", "status": "Success"})
                self._status(405, "MethodNotAllowed")

            def _pods(self, m, query: dict) -> None:
                ns, name = m.group("ns"), m.group("name")
                if name:  # a log
                    pod = fake.pods.get((ns, name))
                    if pod is None:
                        return self._status(404, "NotFound")
                    lines = pod["log"].read_text(errors="replace").splitlines()
                    tail = int(query.get("tailLines", len(lines)))
                    return self._send(200, "\n".join(lines[-tail:]) + "\n", "text/plain")
                key, value = query.get("labelSelector", "=").split("=", 1)
                items = []
                for (pod_ns, pod_name), pod in sorted(fake.pods.items()):
                    if pod_ns != ns or pod["labels"].get(key) != value:
                        continue
                    code = pod["exit_code"]
                    state = {"running": {}} if code is None else {"terminated": {"exitCode": code}}
                    items.append({"metadata": {"name": pod_name, "namespace": ns, "labels": pod["labels"]},
                                  "status": {"containerStatuses": [{"name": pod["container"], "state": state,
                                                                    "ready": False, "restartCount": 0,
                                                                    "image": "x", "imageID": "x"}]}})
                self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_PATCH(self) -> None:
                self._route("PATCH")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        return Handler
