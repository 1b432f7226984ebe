"""Multi-node training from the training step: the TrainJob / PyTorchJob manifests (image, command, resources,
tolerations, shm, workspace), and the launcher against a stand-in API server whose operators run the job's own
command as real torchrun processes on 127.0.0.1."""

import json

import pytest
from k8s_fake_server import FakeKubernetes
from kubernetes_validate import validate
from pydantic import ValidationError
from safetensors.torch import load_file

from caopd.config.launch import LaunchConfig
from caopd.config.sampling import SamplingConfig
from caopd.config.stages import TrainStageConfig
from caopd.config.training import TrainConfig
from caopd.errors import CaopdServiceError, TrainingJobFailed
from caopd.launch.jobs import (
    job_manifest,
    job_name,
    pytorchjob_manifest,
    trainjob_manifest,
)
from caopd.launch.launcher import JobLauncher, JobRef, job_state, trainer_error
from caopd.launch.remote import (
    STAGED_RECORDS,
    checkpoint_progress,
    run_training_stage,
    train_on_cluster,
    workspace_stage,
)
from caopd.stages.train import run_training
from caopd.training.checkpoints import checkpoint_root

K8S_VERSION = "1.37.0"
GPU_LAUNCH = dict(workspace_pvc="caopd-workspace", num_nodes=3, procs_per_node=4, gpus_per_node=4, cpu="32",
                  memory="256Gi", shm_size="32Gi", image="registry.example/caopd-gpu:1.2.3",
                  node_selector={"gpu": "h200"}, secret_env={"HF_TOKEN": "hub-credentials/token"},
                  tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                               {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute"}])
OWNER = {"apiVersion": "v1", "kind": "Pod", "name": "caopd-xyz-opd-training", "uid": "1234",
         "blockOwnerDeletion": False}


def _pod(spec, container):
    """A Pod from a job's pod spec, to check it against the Kubernetes schema (the job kinds are CRDs)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {**spec, "containers": [container]}}


def test_job_nodes_are_shaped_from_their_gpus_unless_given():
    """8 CPUs, 64Gi and 16Gi of /dev/shm per GPU of the node (4, 32Gi and 8Gi without GPUs); a value given replaces
    its derived one."""
    derived = {k: v for k, v in GPU_LAUNCH.items() if k not in ("cpu", "memory", "shm_size")}
    for gpus, expected in [(1, ("8", "64Gi", "16Gi")), (8, ("64", "512Gi", "128Gi")), (0, ("4", "32Gi", "8Gi"))]:
        launch = LaunchConfig(kind="pytorchjob", **{**derived, "gpus_per_node": gpus, "procs_per_node": 1})
        assert tuple(launch.node_shape()) == expected
    job = pytorchjob_manifest("caopd-x", "team-a", LaunchConfig(kind="pytorchjob", **{**derived, "gpus_per_node": 8}),
                              "/c.json", "/out", {}, OWNER)
    [master] = [spec["template"]["spec"] for spec in job["spec"]["pytorchReplicaSpecs"].values()][:1]
    assert master["containers"][0]["resources"]["requests"] == {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": 8}
    assert {v["name"]: v for v in master["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "128Gi"
    given = LaunchConfig(kind="pytorchjob", **{**derived, "gpus_per_node": 8, "cpu": "20"})
    assert tuple(given.node_shape()) == ("20", "512Gi", "128Gi")


def test_the_trainjob_runs_torchrun_on_every_node_with_the_gpus_tolerations_shm_and_workspace():
    launch = LaunchConfig(kind="trainjob", **GPU_LAUNCH)
    job = trainjob_manifest("caopd-caopd-0123456789", "team-a", launch, "/mnt/caopd-workspace/j/config.json",
                            "/mnt/caopd-workspace/j/out", {"caopd.dev/method": "caopd"}, OWNER)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["namespace"] == "team-a" and job["metadata"]["ownerReferences"] == [OWNER]
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == "registry.example/caopd-gpu:1.2.3"
    assert trainer["command"] == ["torchrun", "--nnodes=3", "--nproc-per-node=4", "-m", "caopd.cli", "train",
                                  "--config", "/mnt/caopd-workspace/j/config.json", "--out",
                                  "/mnt/caopd-workspace/j/out", "--quiet"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": 4}
    env = {e["name"]: e for e in trainer["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hub-credentials", "key": "token"}}
    assert env["MLFLOW_TRACKING_URI"]["value"] == ""  # the launching step owns the stage's MLflow run
    [override] = job["spec"]["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    pod = override["spec"]
    assert pod["tolerations"] == GPU_LAUNCH["tolerations"] and pod["nodeSelector"] == {"gpu": "h200"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert volumes["workspace"]["persistentVolumeClaim"] == {"claimName": "caopd-workspace"}
    [container] = pod["containers"]
    assert container["name"] == "node"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/mnt/caopd-workspace"}
    validate(_pod(pod, {**container, "image": trainer["image"], "resources": trainer["resourcesPerNode"],
                        "env": trainer["env"], "command": trainer["command"]}), K8S_VERSION, strict=True)


def test_the_pytorchjob_has_a_master_and_workers_that_find_it_through_the_operators_variables():
    launch = LaunchConfig(kind="pytorchjob", **GPU_LAUNCH)
    job = pytorchjob_manifest("caopd-opd-0123456789", "team-a", launch, "/w/config.json", "/w/out", {})
    assert job["apiVersion"] == "kubeflow.org/v1" and job["spec"]["nprocPerNode"] == "4"
    assert job["spec"]["runPolicy"]["backoffLimit"] == 3
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    for replica in specs.values():
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]["spec"]
        [container] = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == "registry.example/caopd-gpu:1.2.3"
        assert container["command"][:5] == ["torchrun", "--nnodes=3", "--nproc-per-node=4",
                                            "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
        assert pod["tolerations"] == GPU_LAUNCH["tolerations"]
        assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["medium"] == "Memory"
        assert pod["securityContext"]["runAsNonRoot"] is True
        validate(_pod({k: v for k, v in pod.items() if k != "containers"}, container), K8S_VERSION, strict=True)
    single = pytorchjob_manifest("j", "ns", launch.model_copy(update={"num_nodes": 1}), "/c", "/o", {})
    assert list(single["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    cpu_only = trainjob_manifest("j", "ns", LaunchConfig(kind="trainjob", workspace_pvc="w", gpus_per_node=0),
                                 "/c", "/o", {})
    assert "nvidia.com/gpu" not in cpu_only["spec"]["trainer"]["resourcesPerNode"]["limits"]


@pytest.mark.parametrize("fields, message", [
    ({"kind": "trainjob"}, "needs workspace_pvc"),
    ({"kind": "pytorchjob", "workspace_pvc": "w", "procs_per_node": 8, "gpus_per_node": 4}, "own GPU"),
    ({"memory": "64 GB"}, "not a Kubernetes quantity"),
    ({"secret_env": {"HF_TOKEN": "token"}}, "'secret-name/key'"),
    ({"kind": "trainjob", "workspace_pvc": "w", "workspace": "relative"}, "absolute path"),
    ({"kind": "slurm"}, "kind"),
])
def test_a_bad_launch_config_is_refused_up_front_naming_what_to_change(fields, message):
    with pytest.raises(ValidationError, match=message):
        LaunchConfig(**fields)


def test_job_names_are_valid_stable_per_step_and_different_across_runs_and_configs():
    name = job_name("run-1", "caopd", "abc")
    assert name == job_name("run-1", "caopd", "abc") and len(name) <= 63
    assert name != job_name("run-2", "caopd", "abc") and name != job_name("run-1", "caopd", "abd")
    with pytest.raises(ValueError, match="no job to launch"):
        job_manifest(name, "ns", LaunchConfig(), "/c", "/o", {})


def test_the_error_shown_is_the_training_process_not_torchruns_traceback_after_it():
    log = ("step 1\ncaopd: error: x.jsonl: row 3: field 'p': missing field\n"
           "E1129 11:23:33.232000 27154 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed "
           "(exitcode: 2) local_rank: 0 (pid: 27165) of binary: python\nTraceback (most recent call last):\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
    assert trainer_error(log, 1, lines=1) == (2, "caopd: error: x.jsonl: row 3: field 'p': missing field")
    assert trainer_error("Killed\n", 137) == (137, "Killed")  # not under torchrun: the pod's code and tail


@pytest.mark.parametrize("kind, conditions, expected", [
    ("TrainJob", [{"type": "Created", "status": "True"}], ("running", "")),
    ("TrainJob", [{"type": "Complete", "status": "True", "reason": "JobsCompleted"}], ("succeeded", "JobsCompleted")),
    ("TrainJob", [{"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "node-0 exited"}],
     ("failed", "FailedJobs: node-0 exited")),
    ("PyTorchJob", [{"type": "Running", "status": "True"}, {"type": "Succeeded", "status": "True"}],
     ("succeeded", "")),
    ("PyTorchJob", [{"type": "Failed", "status": "False"}, {"type": "Restarting", "status": "True"}],
     ("running", "")),
    ("PyTorchJob", [], ("running", "")),
])
def test_the_job_state_comes_from_its_true_conditions(kind, conditions, expected):
    assert job_state({"kind": kind, "status": {"conditions": conditions}}) == expected


def _stage_config(records, workspace, **launch):
    train = TrainConfig(steps=3, prompts_per_step=4, k=1, micro_batch_size=4, save_every=2,
                        sampling=SamplingConfig(temperature=0.0, max_new_tokens=24))
    return TrainStageConfig(records=records, train=train,
                            launch=LaunchConfig(workspace_pvc="ws", workspace=str(workspace), gpus_per_node=0,
                                                cpu="1", memory="2Gi", poll_s=0.2, **launch))


@pytest.mark.slow  # torchrun on two fake nodes
def test_a_two_node_trainjob_trains_like_one_process_and_its_model_becomes_the_steps_output(tmp_path, records):
    cfg = _stage_config(records, tmp_path / "workspace", kind="trainjob", num_nodes=2)
    lines = []
    with FakeKubernetes(tmp_path) as k8s:
        summary = train_on_cluster(cfg, tmp_path / "step", "run-1", JobLauncher(k8s.api_client()), lines.append)
    assert [env["PET_NODE_RANK"] for env in k8s.node_envs] == ["0", "1"]
    assert summary["launch"]["kind"] == "trainjob" and summary["launch"]["submitted"] == "created"
    assert summary["steps"] == 3 and lines[0].startswith("created TrainJob default/caopd-caopd-")
    assert lines[-1].endswith(": succeeded")
    # the staged inputs and checkpoints are gone from the workspace; the outputs are this step's
    assert not workspace_stage(cfg, "run-1")[1].exists()
    assert sorted(p.name for p in (tmp_path / "step").iterdir()) == [
        "model", "summary.json", "train_log.jsonl", "training_curves.png"]

    local = run_training(cfg.model_copy(update={"launch": LaunchConfig()}), tmp_path / "local", progress=False)
    remote_log = [json.loads(x) for x in (tmp_path / "step" / "train_log.jsonl").read_text().splitlines()]
    local_log = [json.loads(x) for x in (tmp_path / "local" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in remote_log] == pytest.approx([r["loss"] for r in local_log], rel=1e-4)
    assert local["steps"] == summary["steps"]
    a = load_file(tmp_path / "step" / "model" / "model.safetensors")
    b = load_file(tmp_path / "local" / "model" / "model.safetensors")
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


@pytest.mark.slow  # torchrun in a fake pod
def test_a_failed_pytorchjob_fails_the_step_with_the_jobs_condition_and_its_pods_own_error(tmp_path, records):
    bad = tmp_path / "bad_records.jsonl"  # valid JSON, but no P: only the training itself finds out
    bad.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "p"}) + "\n"
                           for line in open(records)))
    cfg = _stage_config(str(bad), tmp_path / "workspace", kind="pytorchjob", num_nodes=1)
    with FakeKubernetes(tmp_path) as k8s, pytest.raises(TrainingJobFailed) as failure:
        train_on_cluster(cfg, tmp_path / "step", "run-1", JobLauncher(k8s.api_client()), lambda _: None)
    message = str(failure.value)
    assert "PyTorchJob default/caopd-caopd-" in message and "BackoffLimitExceeded" in message
    assert f"{STAGED_RECORDS}: row 0: field 'p': missing field" in message  # the job's own error, from its log
    assert "training exited with code 2" in message and "ChildFailedError" not in message
    assert not (tmp_path / "step" / "model").exists()


def test_a_retried_step_adopts_its_running_job_and_replaces_a_failed_one(tmp_path):
    manifest = job_manifest("caopd-caopd-0000000001", "ns", LaunchConfig(kind="trainjob", workspace_pvc="w"),
                            "/c", "/o", {}, OWNER)
    ref = JobRef.of(manifest)
    with FakeKubernetes(tmp_path) as k8s:
        k8s.hold = True
        launcher = JobLauncher(k8s.api_client())
        assert launcher.submit(manifest) == "created"
        retry = {**manifest, "metadata": {**manifest["metadata"], "ownerReferences": [{**OWNER, "uid": "5678"}]}}
        assert launcher.submit(retry) == "adopted"  # still running: the retry waits for it
        owners = launcher.get(ref)["metadata"]["ownerReferences"]
        assert [o["uid"] for o in owners] == ["1234", "5678"]  # lives until both tries' pods are gone
        key = ("trainjobs", "ns", ref.name)
        k8s.set_condition(key, "Complete", "JobsCompleted", "")
        assert launcher.submit(manifest, can_adopt=lambda: False) == "replaced"  # its outputs are gone: rerun
        k8s.set_condition(key, "Failed", "FailedJobs", "node-0 OOMKilled")
        assert launcher.submit(manifest) == "replaced"
        assert [m for m, p in k8s.requests if m == "DELETE"] == ["DELETE", "DELETE"]
        assert job_state(launcher.get(ref)) == ("running", "")
        with pytest.raises(TrainingJobFailed, match="did not finish within 0 s; deleted it"):
            launcher.wait(ref, timeout_s=0, poll_s=0.1, report=lambda _: None)
        assert launcher.get(ref) is None


def test_while_the_job_runs_the_step_reports_its_newest_complete_checkpoint(tmp_path):
    manifest = job_manifest("caopd-caopd-0000000002", "ns", LaunchConfig(kind="trainjob", workspace_pvc="w"),
                            "/c", "/o", {}, OWNER)
    ref, job_out = JobRef.of(manifest), tmp_path / "out"
    assert checkpoint_progress(job_out, 3) == "no checkpoint yet (of 3 steps)"
    for step, complete in ((1, True), (2, True), (3, False)):  # step 3 is still being written: no state.json yet
        folder = checkpoint_root(job_out) / f"step-{step:07d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "state.json").write_text("{}")
    lines = []
    with FakeKubernetes(tmp_path) as k8s:
        k8s.hold = True
        launcher = JobLauncher(k8s.api_client())
        launcher.submit(manifest)

        def report(line):  # the job completes once its progress has been seen: no timing involved
            lines.append(line)
            k8s.set_condition(("trainjobs", "ns", ref.name), "Complete", "JobsCompleted", "")

        launcher.wait(ref, timeout_s=60, poll_s=0.01, report=report, progress=lambda: checkpoint_progress(job_out, 3))
    assert lines == [f"TrainJob {ref.name}: running, checkpoint at step 2/3", f"TrainJob {ref.name}: succeeded"]


def test_a_cluster_without_the_job_kind_fails_the_step_naming_the_missing_operator(tmp_path, records):
    cfg = _stage_config(records, tmp_path / "workspace", kind="trainjob", namespace="team-b")
    with FakeKubernetes(tmp_path) as k8s:
        k8s.crds = {"pytorchjobs"}
        with pytest.raises(CaopdServiceError, match="create TrainJob team-b/caopd-caopd-.*HTTP 404.*CRD installed"):
            train_on_cluster(cfg, tmp_path / "step", "run-1", JobLauncher(k8s.api_client()), lambda _: None)


@pytest.mark.slow  # torchrun
def test_in_a_pod_with_the_workspace_the_checkpoints_live_there_and_torchrun_runs_for_several_procs(
        tmp_path, records):
    cfg = _stage_config(records, tmp_path / "workspace", procs_per_node=2)
    summary = run_training_stage(cfg, tmp_path / "step", progress=False, pipeline_run_id="run-1")
    assert summary["steps"] == 3 and (tmp_path / "step" / "model" / "model.safetensors").is_file()
    assert not workspace_stage(cfg, "run-1")[1].exists()


@pytest.mark.slow  # torchrun in a fake pod
def test_caopd_train_launches_a_pytorchjob_with_the_kubeconfig_of_the_shell(tmp_path, records, monkeypatch, capsys):
    from caopd.cli import main

    flags = ["train", "--records", records, "--out", str(tmp_path / "step"), "--quiet", "--train.steps", "2",
             "--train.prompts-per-step", "2", "--train.k", "2", "--launch.kind", "pytorchjob"]
    assert main(flags) == 2  # no workspace: refused before anything runs
    assert "needs workspace_pvc" in capsys.readouterr().err
    flags += ["--launch.workspace-pvc", "ws", "--launch.workspace", str(tmp_path / "workspace"),
              "--launch.gpus-per-node", "0", "--launch.poll-s", "0.2"]
    with FakeKubernetes(tmp_path) as k8s:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": k8s.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me", "namespace": "team-c"}}],
            "users": [{"name": "me", "user": {"token": "t"}}]}))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: the kubeconfig
        assert main(flags) == 0
    assert [key[:2] for key in k8s.objects] == [("pytorchjobs", "team-c")]  # the context's namespace
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 2  # stdout: the summary; the job's progress went to stderr
    assert "created PyTorchJob team-c/caopd-caopd-" in err and "succeeded" in err
    assert json.loads((tmp_path / "step" / "summary.json").read_text())["launch"]["kind"] == "pytorchjob"


def test_a_retried_pod_resumes_from_the_checkpoint_its_predecessor_left_in_the_workspace(tmp_path, records):
    cfg = _stage_config(records, tmp_path / "workspace")  # in the pod, with the workspace mounted
    _, stage = workspace_stage(cfg, "run-1")
    # the first pod got through two of three steps (and checkpointed them) before it was preempted
    partial = cfg.model_copy(update={"launch": LaunchConfig(), "train": cfg.train.model_copy(update={"steps": 2})})
    run_training(partial, stage / "out", progress=False)
    summary = run_training_stage(cfg, tmp_path / "step", progress=False, pipeline_run_id="run-1")  # the retry
    run_training(cfg.model_copy(update={"launch": LaunchConfig()}), tmp_path / "whole", progress=False)
    retried = [json.loads(x) for x in (tmp_path / "step" / "train_log.jsonl").read_text().splitlines()]
    whole = [json.loads(x) for x in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in retried] == [r["loss"] for r in whole] and summary["steps"] == 3
    a, b = load_file(tmp_path / "step" / "model" / "model.safetensors"), load_file(
        tmp_path / "whole" / "model" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
