"""The Helm chart: it lints, renders for the default values and for existing MLflow/PostgreSQL/S3, every rendered
manifest validates strictly against the Kubernetes schemas, pods run as non-root with limits, and a bad values
file fails the schema naming the key."""

import re
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "caopd"
KUBERNETES_VERSION = "1.37.0"
EXISTING = {  # the platform already runs MLflow (with its database) and an S3-compatible store
    "mlflow": {"enabled": False, "externalUrl": "https://mlflow.example.com"},
    "postgresql": {"enabled": False},
    "s3": {"endpoint": "https://minio.example.com", "existingSecret": "team-s3"},
    "retraining": {"parameters": {"base_model": "Qwen/Qwen3-8B", "steps": 500}},
}
WITH_EXTERNAL_DATABASE = {"postgresql": {"enabled": False}, "database": {"existingSecret": "mlflow-db"}}
WITH_WORKSPACE = {"workspace": {"enabled": True, "storageClassName": "nfs-client", "size": "2Ti"}}


def _render(values=None):
    chart = helm_python.Chart.load(str(CHART))
    rendered = chart.render(values or {}, name="caopd", namespace="ml")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def _pod_specs(manifests):
    for doc in manifests:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc["kind"], doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            yield doc["kind"], doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_the_chart_lints_clean():
    report = helm_python.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [None, EXISTING, WITH_EXTERNAL_DATABASE, WITH_WORKSPACE],
                         ids=["default", "existing", "external-db", "workspace"])
def test_every_rendered_manifest_validates_strictly(values):
    manifests = _render(values)
    assert manifests
    for doc in manifests:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("values", [None, EXISTING], ids=["default", "existing"])
def test_pods_run_as_non_root_with_limits_and_credentials_from_secrets(values):
    manifests = _render(values)
    specs = list(_pod_specs(manifests))
    assert specs
    for kind, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, kind
        for container in spec["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), (kind, container["name"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            for env in container.get("env", []):  # a credential only ever arrives by reference
                if re.search("PASSWORD|SECRET|ACCESS_KEY", env["name"]):
                    assert "secretKeyRef" in env["valueFrom"], env["name"]
                elif env["name"] == "BACKEND_STORE_URI":  # from a Secret, or built from one by the kubelet
                    assert "secretKeyRef" in env.get("valueFrom", {}) or "$(DB_PASSWORD)" in env["value"]


def test_default_install_runs_mlflow_on_postgresql_with_s3_artifacts():
    by_kind = {}
    for doc in _render():
        by_kind.setdefault(doc["kind"], []).append(doc)
    [mlflow] = [d for d in by_kind["Deployment"] if d["metadata"]["name"] == "caopd-mlflow"]
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["mlflow", "server"] and "s3://caopd/mlflow" in container["command"]
    backend = next(e for e in container["env"] if e["name"] == "BACKEND_STORE_URI")["value"]
    assert backend.startswith("postgresql://mlflow:$(DB_PASSWORD)@caopd-postgresql:5432/")
    assert [s["metadata"]["name"] for s in by_kind["StatefulSet"]] == ["caopd-postgresql"]
    [role] = by_kind["Role"]
    trainjobs = next(r for r in role["rules"] if "trainjobs" in r["resources"])
    assert {"create", "watch", "delete"} <= set(trainjobs["verbs"])
    [binding] = by_kind["RoleBinding"]
    assert binding["subjects"][0]["name"] == by_kind["ServiceAccount"][0]["metadata"]["name"]
    [cron] = by_kind["CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cron["spec"]["schedule"] == "0 3 * * 0" and pod["containers"][0]["command"][:2] == ["caopd", "submit"]
    assert "http://caopd-mlflow.ml.svc.cluster.local:5000" in " ".join(pod["containers"][0]["command"])
    token = pod["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "pipelines.kubeflow.org"  # where `caopd submit` finds its KFP token


def test_existing_services_deploy_no_server_and_the_cron_points_at_them():
    manifests = _render(EXISTING)
    assert {d["kind"] for d in manifests} == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    [cron] = [d for d in manifests if d["kind"] == "CronJob"]
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert any("https://mlflow.example.com" in arg for arg in command)
    assert "base_model=Qwen/Qwen3-8B" in command and "steps=500" in command


def test_the_workspace_is_a_kept_read_write_many_claim_that_the_step_may_adopt_jobs_from():
    manifests = _render(WITH_WORKSPACE)
    [claim] = [d for d in manifests if d["kind"] == "PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "caopd-workspace"  # the name `caopd compile --workspace-pvc` is given
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs-client"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Ti"
    assert not [d for d in _render() if d["kind"] == "PersistentVolumeClaim"]
    [role] = [d for d in manifests if d["kind"] == "Role"]
    jobs = [r for r in role["rules"] if {"trainjobs", "pytorchjobs"} & set(r["resources"])]
    assert all({"create", "get", "patch", "delete"} <= set(r["verbs"]) for r in jobs) and len(jobs) == 2


@pytest.mark.parametrize("values, message", [
    ({"workspace": {"size": "lots"}}, "/workspace/size"),
    ({"mlflow": {"port": "http"}}, "/mlflow/port': got string, want integer"),
    ({"retraining": {"schedul": "0 3 * * 0"}}, "additional properties 'schedul' not allowed"),
    ({"retraining": {"schedule": "every sunday"}}, "/retraining/schedule"),
    ({"mlflow": {"enabled": False}}, "/mlflow/externalUrl"),
    ({"postgresql": {"enabled": False}}, "/database/existingSecret"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"mlflow": {"resources": {"limits": {"cpu": "two"}}}}, "/mlflow/resources/limits/cpu"),
])
def test_a_bad_values_file_fails_the_schema_naming_the_key(values, message):
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(message)):
        _render(values)


def test_every_key_in_values_yaml_has_a_comment():
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][\w-]*:", line):
            previous = next(lines[i] for i in range(number - 1, -1, -1) if lines[i].strip())
            assert previous.strip().startswith("# --"), f"values.yaml line {number + 1}: {line.strip()} has no comment"
