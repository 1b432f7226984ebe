"""The compiled pipeline: committed spec = fresh compile, and every task's pod shape read from the spec."""

import builtins
import inspect
import json
import os
import subprocess
import sys

import pytest
import yaml

from caopd.config.images import IMAGE_CACHE_DIR
from caopd.config.launch import WORKSPACE_MOUNT
from caopd.config.stages import DataConfig
from caopd.config.training import TrainConfig
from caopd.pipelines import COMPILED_PIPELINE, caopd_pipeline, compile_pipeline

GPU_STAGES = {"rollout-estimation", "opd-training", "calibration-evaluation", "continual-distillation",
              "continual-evaluation"}
CPU_STAGES = {"data-preparation", "rollout-shard-indices", "merge-rollout-shards", "training-arms",
              "target-replacement", "model-registration", "continual-enabled", "gpu-pod-shape"}
# the GPU count of each GPU stage's pod, and the task that derives its CPU and memory from that count
GPU_COUNT = {stage: "training_gpus" if stage == "opd-training" else "accelerator_count" for stage in GPU_STAGES}
SHAPE_OF_COUNT = {"accelerator_count": "gpu-pod-shape", "training_gpus": "gpu-pod-shape-2"}
GPU_PARAMETERS = {"accelerator_type", "accelerator_count", "gpu_node_selector", "gpu_tolerations"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "caopd_pipeline.yaml")
    pipeline, platform = yaml.safe_load_all(path.read_text())
    return {"path": path, "pipeline": pipeline, "platform": platform}


def _tasks(pipeline):
    """(dag component name, task name, task) for every task in the root DAG and the sub-DAGs."""
    dags = [("root", pipeline["root"])] + [(n, c) for n, c in pipeline["components"].items() if "dag" in c]
    return [(dag, name, task) for dag, component in dags for name, task in component["dag"]["tasks"].items()]


def _executor(pipeline, task):
    return pipeline["components"][task["componentRef"]["name"]].get("executorLabel")


def _bare(parameter):
    return parameter.removeprefix("pipelinechannel--")


def _param(name):
    return f"{{{{$.inputs.parameters['pipelinechannel--{name}']}}}}"


def test_committed_spec_is_a_fresh_compile(spec):
    assert COMPILED_PIPELINE.read_bytes() == spec["path"].read_bytes(), (
        "pipelines/caopd_pipeline.yaml is stale: run `caopd compile --out pipelines/caopd_pipeline.yaml`")


@pytest.mark.slow  # ~5 s: two compiles in processes of their own
def test_compiling_is_reproducible_across_processes(tmp_path):
    # kfp prints dict defaults in protobuf-map order, which follows each process's hash seed.
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", "import sys; from caopd.pipelines import compile_pipeline; "
                        "compile_pipeline(sys.argv[1])", str(tmp_path / f"{seed}.yaml")],
                       check=True, env={**os.environ, "PYTHONHASHSEED": seed})
    assert (tmp_path / "1.yaml").read_bytes() == (tmp_path / "2.yaml").read_bytes()


def test_every_stage_is_a_named_component(spec):
    names = {task["componentRef"]["name"].removeprefix("comp-") for _, _, task in _tasks(spec["pipeline"])
             if _executor(spec["pipeline"], task)}
    # the pod shape runs twice (the training pods' GPU count, the others'): kfp numbers the second component
    assert names == GPU_STAGES | CPU_STAGES | {"gpu-pod-shape-2"}


def test_gpu_stages_take_accelerator_resources_and_pod_settings_from_parameters(spec):
    pipeline, platform = spec["pipeline"], spec["platform"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    seen = set()
    for _, name, task in _tasks(pipeline):
        executor = _executor(pipeline, task)
        stage = task["componentRef"]["name"].removeprefix("comp-")
        if stage not in GPU_STAGES:
            continue
        seen.add(stage)
        resources = pipeline["deploymentSpec"]["executors"][executor]["container"]["resources"]
        # the training step has its own count: 0 when it only launches a job on other nodes
        count, shape = GPU_COUNT[stage], SHAPE_OF_COUNT[GPU_COUNT[stage]]
        assert resources["accelerator"] == {"resourceType": _param("accelerator_type"),
                                            "resourceCount": _param(count)}, name
        # CPU and memory, request and limit, from the shape task of the same GPU count
        assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == _param(f"{shape}-cpu"), name
        assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == _param(f"{shape}-memory")
        pod = k8s[executor]
        # A task at the root reads the pipeline parameter itself; one inside a sub-DAG reads its channel.
        [toleration] = pod["tolerations"]
        assert _bare(toleration["tolerationJson"]["componentInputParameter"]) == "gpu_tolerations", name
        assert _bare(pod["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"]) == "gpu_node_selector"
        # /dev/shm without a size limit: sized by the pod's memory limit, which grows with its GPUs
        assert pod["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"},
                                         {"mountPath": IMAGE_CACHE_DIR, "volumeName": "cache"}]  # downloads
        assert "pvcMount" not in pod, name  # the default spec needs no volume the cluster may not have
    assert seen == GPU_STAGES


def test_a_workspace_pvc_compiled_in_is_mounted_on_the_training_step_alone(tmp_path):
    path = compile_pipeline(tmp_path / "ws.yaml", workspace_pvc="caopd-workspace")
    pipeline, platform = yaml.safe_load_all(path.read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounts = {executor: pod["pvcMount"] for executor, pod in k8s.items() if "pvcMount" in pod}
    assert list(mounts) == ["exec-opd-training"]
    [mount] = mounts["exec-opd-training"]
    assert mount["mountPath"] == WORKSPACE_MOUNT and mount["constant"] == "caopd-workspace"
    # the component learns the volume's name, and with it where its checkpoints and jobs live
    training = next(t for _, _, t in _tasks(pipeline) if t["componentRef"]["name"] == "comp-opd-training")
    assert training["inputs"]["parameters"]["workspace_pvc"] == {"runtimeValue": {"constant": "caopd-workspace"}}


# The tasks that log to MLflow: each gets the pipeline identity's credentials, the others none.
TRACKING_STAGES = {"data-preparation", "rollout-estimation", "target-replacement", "opd-training",
                   "calibration-evaluation", "continual-distillation", "continual-evaluation", "model-registration"}


def _secret_env(platform) -> dict[str, dict[str, str]]:
    """executor → {variable: 'secret/key'} with each reference's optional flag checked."""
    found = {}
    for executor, pod in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        for ref in pod.get("secretAsEnv", []):
            assert ref["optional"] is True, executor  # a cluster without the Secret still starts the pods
            for pair in ref["keyToEnv"]:
                found.setdefault(executor, {})[pair["envVar"]] = f"{ref['secretName']}/{pair['secretKey']}"
    return found


def test_tasks_that_track_get_the_pipeline_identity_from_its_secret_and_no_other_task_does(spec):
    from caopd.config.tracking import PIPELINE_SECRET_ENV

    pipeline = spec["pipeline"]
    executors = {_executor(pipeline, t): t["componentRef"]["name"].removeprefix("comp-") for _, _, t in
                 _tasks(pipeline)}
    found = _secret_env(spec["platform"])
    assert {executors[e] for e in found} == TRACKING_STAGES
    assert all(env == PIPELINE_SECRET_ENV for env in found.values())
    assert PIPELINE_SECRET_ENV == {"MLFLOW_TRACKING_USERNAME": "caopd-mlflow-pipeline/username",
                                   "MLFLOW_TRACKING_PASSWORD": "caopd-mlflow-pipeline/password"}


def test_compile_names_another_identity_secret_and_more_variables(tmp_path, capsys):
    from caopd.cli import EXIT_BAD_INPUT, main

    out = tmp_path / "other.yaml"
    assert main(["compile", "--out", str(out), "--mlflow-secret", "team-mlflow",
                 "--secret-env", "HF_TOKEN=hub-token/token"]) == 0
    [env] = {json.dumps(e, sort_keys=True) for e in _secret_env(list(yaml.safe_load_all(out.read_text()))[1])
             .values()}
    assert json.loads(env) == {"MLFLOW_TRACKING_USERNAME": "team-mlflow/username",
                               "MLFLOW_TRACKING_PASSWORD": "team-mlflow/password", "HF_TOKEN": "hub-token/token"}
    capsys.readouterr()
    assert main(["compile", "--out", str(out), "--secret-env", "HF_TOKEN=Bad_Secret"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "field '--secret-env'" in err and "write it as 'secret-name/key'" in err


def test_cpu_stages_request_no_gpu_and_no_gpu_pod_settings(spec):
    pipeline = spec["pipeline"]
    k8s = spec["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for _, name, task in _tasks(pipeline):
        executor = _executor(pipeline, task)
        if task["componentRef"]["name"].removeprefix("comp-") not in CPU_STAGES:
            continue
        resources = pipeline["deploymentSpec"]["executors"][executor]["container"]["resources"]
        assert "accelerator" not in resources, name
        assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"]) == ("1", "4Gi"), name
        assert set(k8s.get(executor, {})) <= {"secretAsEnv"}, name  # no tolerations, node selector or shm
        assert pipeline["deploymentSpec"]["executors"][executor]["container"]["image"].startswith(
            "ghcr.io/caopd/caopd-cpu:")


def test_sub_dags_receive_the_gpu_parameters_their_tasks_use(spec):
    # kfp 2.17 does not pass resource parameters into a ParallelFor's DAG by itself; the run then fails
    # with "parent pipeline input argument not found". Every DAG holding a GPU task must declare them and
    # its parent task must pass them.
    pipeline = spec["pipeline"]
    for dag, name, task in _tasks(pipeline):
        if task["componentRef"]["name"].removeprefix("comp-") not in GPU_STAGES or dag == "root":
            continue
        shape = SHAPE_OF_COUNT[GPU_COUNT[task["componentRef"]["name"].removeprefix("comp-")]]
        needed = {f"pipelinechannel--{p}" for p in GPU_PARAMETERS | {f"{shape}-cpu", f"{shape}-memory"}}
        declared = set(pipeline["components"][dag]["inputDefinitions"]["parameters"])
        assert needed <= declared, (dag, name)
        parent = next(t for _, _, t in _tasks(pipeline) if t["componentRef"]["name"] == dag)
        assert needed <= set(parent["inputs"]["parameters"])


def test_gpu_pods_grow_with_their_gpu_count(spec):
    """Each shape task reads its GPU count and the overrides from the pipeline's parameters; what it computes grows
    with the count (a training pod of 8 GPUs runs 8 workers), and an override replaces it."""
    from caopd.components import gpu_pod_shape

    root = spec["pipeline"]["root"]["dag"]["tasks"]
    for count, shape in SHAPE_OF_COUNT.items():
        inputs = {name: _bare(value["componentInputParameter"])
                  for name, value in root[shape]["inputs"]["parameters"].items()}
        assert inputs == {"gpus": count, "cpu": "gpu_cpu_request", "memory": "gpu_memory_request"}
    defaults = spec["pipeline"]["root"]["inputDefinitions"]["parameters"]
    assert defaults["gpu_cpu_request"]["defaultValue"] == defaults["gpu_memory_request"]["defaultValue"] == ""
    shape_of = gpu_pod_shape.python_func
    assert tuple(shape_of(gpus=1, cpu="", memory="")) == ("8", "64Gi")
    assert tuple(shape_of(gpus=8, cpu="", memory="")) == ("64", "512Gi")
    assert tuple(shape_of(gpus=0, cpu="", memory="")) == ("4", "32Gi")  # a pod that launches a job elsewhere
    assert tuple(shape_of(gpus=8, cpu="20", memory="")) == ("20", "512Gi")
    with pytest.raises(ValueError, match="memory '64GB' is not a Kubernetes quantity"):
        shape_of(gpus=1, cpu="", memory="64GB")  # the shape step fails, naming it, before any GPU pod is created


def test_caching_and_retries(spec):
    by_stage = {}
    for _, _, task in _tasks(spec["pipeline"]):
        stage = task["componentRef"]["name"].removeprefix("comp-")
        if stage in GPU_STAGES | CPU_STAGES:
            by_stage[stage] = task
    assert by_stage["model-registration"].get("cachingOptions", {}).get("enableCache", False) is False
    assert "retryPolicy" not in by_stage["model-registration"]
    for stage, task in by_stage.items():
        if stage != "model-registration":
            assert task["cachingOptions"]["enableCache"] is True, stage
    for stage in ("data-preparation", "rollout-estimation", "merge-rollout-shards", "target-replacement",
                  "opd-training", "calibration-evaluation", "continual-distillation", "continual-evaluation"):
        assert by_stage[stage]["retryPolicy"]["maxRetryCount"] >= 1, stage
    assert by_stage["rollout-estimation"]["retryPolicy"]["backoffDuration"] == "60s"


def test_rollouts_fan_out_and_arms_train_side_by_side(spec):
    pipeline = spec["pipeline"]
    loops = {dag: {t["componentRef"]["name"] for t in pipeline["components"][dag]["dag"]["tasks"].values()}
             for dag, _, _ in _tasks(pipeline) if dag != "root"}
    assert {"comp-rollout-estimation"} in loops.values()
    [arms_loop] = [tasks for tasks in loops.values() if "comp-opd-training" in tasks]
    assert {"comp-target-replacement", "comp-opd-training"} < arms_loop
    # the calibration-forgetting branch runs per arm, under a condition inside the arms' loop
    [branch] = [name for name in arms_loop if name.startswith("comp-condition")]
    assert loops[branch] == {"comp-continual-distillation", "comp-continual-evaluation"}
    inputs = {name: c.get("inputDefinitions", {}).get("artifacts", {}) for name, c in pipeline["components"].items()}
    assert inputs["comp-merge-rollout-shards"]["shards"]["isArtifactList"] is True
    assert inputs["comp-calibration-evaluation"]["models"]["isArtifactList"] is True
    assert inputs["comp-model-registration"]["models"]["isArtifactList"] is True


def test_pipeline_defaults_are_the_stage_configs_defaults(spec):
    params = spec["pipeline"]["root"]["inputDefinitions"]["parameters"]
    train, data = TrainConfig(), DataConfig()
    for name in ("steps", "prompts_per_step", "lr", "k", "beta", "ema_rate", "divergence", "variant", "teacher",
                 "p_source", "teacher_context"):
        assert params[name]["defaultValue"] == getattr(train, name), name
    for name in ("n_train", "n_eval", "kind_weights"):
        assert params[name]["defaultValue"] == getattr(data, name), name
    assert params["ood_kinds"].get("defaultValue", []) == data.ood_kinds == []
    assert params["continual_kinds"].get("defaultValue", []) == data.continual_kinds == []
    assert params["base_model"]["defaultValue"] == "tiny"


def test_parameters_are_ordered_by_stage():
    order = list(inspect.signature(caopd_pipeline.pipeline_func).parameters)
    stages = [["task", "n_train", "ood_kinds", "continual_kinds", "seed"], ["base_model", "k", "rollout_shards"],
              ["teacher_context"],
              ["train_baseline", "steps", "lr", "train_launch", "train_sharding", "train_engine",
               "training_gpus"], ["eval_seed"],
              ["model_name", "promotion_gates"], ["mlflow_settings"],
              ["accelerator_type", "gpu_tolerations"]]
    positions = [[order.index(name) for name in stage] for stage in stages]
    assert all(max(a) < min(b) for a, b in zip(positions, positions[1:]))


@pytest.mark.slow
def test_local_run_fans_rollouts_out_skips_the_baseline_scores_held_out_kinds_and_continues_on_task_b(tmp_path):
    from caopd.config.run import RunConfig
    from caopd.io import read_json
    from caopd.kfp.local import run_main_job

    print_before = builtins.print
    cfg = RunConfig.model_validate({"n_train": 10, "n_eval": 12, "k": 2, "rollout_shards": 2, "train_baseline": False,
                                    "ood_kinds": ["mul_2x2"], "continual_kinds": ["add_1x1", "mul_1x1"],
                                    "train": {"steps": 1, "prompts_per_step": 2}})
    summary = run_main_job(cfg, tmp_path, progress=False)
    assert set(summary["arms"]) == set(summary["ood"]) == {"base", "caopd"}
    ood_kinds = {json.loads(line)["kind"] for line in (tmp_path / "evaluation" / "predictions_caopd_ood.jsonl").open()}
    assert ood_kinds == {"mul_2x2"} and "ood:" in (tmp_path / "comparison.md").read_text()
    # task B: kept out of task A, trained on from the arm's model, and task A scored before and after it
    [forgetting] = summary["continual"].values()
    assert set(summary["continual"]) == {"caopd"}
    assert set(forgetting) == {"ece_a_before", "ece_a_after", "accuracy_a_before", "accuracy_a_after", "ece_b_after"}
    assert forgetting["ece_a_before"] == summary["arms"]["caopd"]["ece"]  # same model, prompts and seed
    assert "calibration forgetting" in (tmp_path / "comparison.md").read_text()
    [pipeline_run] = (tmp_path / "kfp").glob("caopd-*")
    shards = sorted(p.name for p in pipeline_run.iterdir() if p.name.startswith("for-loop-1-iteration-"))
    assert len(shards) == 2
    merged = read_json(next(pipeline_run.glob("merge-rollout-shards/rollouts")) / "summary.json")
    assert merged["n_prompts"] == 10 and len(merged["shards"]) == 2
    assert not (tmp_path / "train_opd").exists()
    data_dir = next(pipeline_run.glob("data-preparation/data"))
    task_a = {json.loads(line)["kind"] for name in ("train.jsonl", "eval.jsonl") for line in (data_dir / name).open()}
    task_b = {json.loads(line)["kind"] for line in (data_dir / "continual_train.jsonl").open()}
    assert task_b == {"add_1x1", "mul_1x1"} and not task_a & (task_b | {"mul_2x2"})
    [on_b] = pipeline_run.glob("**/continual-distillation/continual_model")
    trained_from = read_json(on_b / "train" / "summary.json")["config"]["model"]
    assert trained_from == str(next(pipeline_run.glob("**/opd-training/model")) / "model")
    # kfp.local patches print per task; with two iterations in threads the patch outlived its run.
    assert builtins.print is print_before
