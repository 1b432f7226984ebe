"""The Helm chart: it lints, renders for the default values, for existing MLflow/PostgreSQL/S3, with auth off and
with every identity on, every rendered manifest validates strictly against the Kubernetes schemas, pods run as
non-root with limits and take every credential by reference, the authenticated MLflow server runs caopd's app with
a config MLflow itself reads, the bootstrap Job mounts each identity's Secret where its command looks, the
NetworkPolicies admit exactly the listed peers, and a bad values file fails the schema naming the key."""

import configparser
import functools
import json
import re
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from caopd.cli import build_parser
from caopd.config.stages import RegisterConfig
from caopd.config.tracking import AUTH_APP_NAME, PIPELINE_CREDENTIALS_SECRET, PROTECTED_ALIASES, TrackingConfig
from caopd.kfp.submit import parse_params, pipeline_parameters
from caopd.tracking import server_app

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "caopd"
COMPILED_PIPELINE = ROOT / "pipelines" / "caopd_pipeline.yaml"  # what `caopd submit` uploads from the image
KUBERNETES_VERSION = "1.37.0"
EXISTING = {  # the platform already runs MLflow (with its database) and an S3-compatible store
    "mlflow": {"enabled": False, "externalUrl": "https://mlflow.example.com"},
    "postgresql": {"enabled": False},
    "s3": {"endpoint": "https://minio.example.com", "existingSecret": "team-s3"},
    "retraining": {"parameters": {"base_model": "Qwen/Qwen3-8B", "steps": 500}},
}
WITH_EXTERNAL_DATABASE = {"postgresql": {"enabled": False}, "database": {"existingSecret": "mlflow-db"}}
WITH_WORKSPACE = {"workspace": {"enabled": True, "storageClassName": "nfs-client", "size": "2Ti"}}
WITH_EVERY_IDENTITY = {  # reader and promoter on, the UI behind ingress-nginx, runs only in one profile's namespace
    "mlflow": {"auth": {"reader": {"enabled": True}, "promoter": {"enabled": True, "secret": "release-bot"},
                        "protectedAliases": ["champion", "production"], "credentialCacheSeconds": 0,
                        "experiment": "support-bot", "registeredModel": "support-bot-8b"},
               "allowedHosts": ["mlflow.example.com"], "allowedOrigins": ["https://mlflow.example.com"]},
    "networkPolicy": {"uiIngress": {"enabled": True},
                      "pipelineRunner": {"namespaceLabels": {"kubernetes.io/metadata.name": "team-ml"}}},
    "retraining": {"parameters": {"model_name": "support-bot-8b"}},
}
WITHOUT_AUTH = {"mlflow": {"auth": {"enabled": False}}}
VALUE_SETS = {"default": None, "existing": EXISTING, "external-db": WITH_EXTERNAL_DATABASE,
              "workspace": WITH_WORKSPACE, "every-identity": WITH_EVERY_IDENTITY, "no-auth": WITHOUT_AUTH}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN")


def _render(values=None):
    chart = helm_python.Chart.load(str(CHART))
    rendered = chart.render(values or {}, name="caopd", namespace="ml")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def _rendered(name: str) -> tuple:
    """The manifests of one of VALUE_SETS, rendered once (a test must not change them)."""
    return tuple(_render(VALUE_SETS[name]))


def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _pod_templates(manifests):
    """(kind, pod template) of every workload: its labels and its spec."""
    for doc in manifests:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc["kind"], doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            yield doc["kind"], doc["spec"]["jobTemplate"]["spec"]["template"]


def _pod_specs(manifests):
    for kind, template in _pod_templates(manifests):
        yield kind, template["spec"]


def _one(manifests, kind, name=None):
    [doc] = [d for d in manifests if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def _container(workload):
    template = workload["spec"]["jobTemplate"]["spec"]["template"] if workload["kind"] == "CronJob" \
        else workload["spec"]["template"]
    return template["spec"]["containers"][0]


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _option(command, flag):
    return command[command.index(flag) + 1]


def _strings(node):
    """Every string in a manifest, however deep."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def test_the_chart_lints_clean():
    report = helm_python.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_manifest_validates_strictly(name):
    manifests = _rendered(name)
    assert manifests
    for doc in manifests:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_run_as_non_root_with_limits_and_credentials_from_secrets(name):
    specs = list(_pod_specs(_rendered(name)))
    assert specs
    for kind, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, kind
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), (kind, container["name"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            for env in container.get("env", []):  # a credential only ever arrives by reference
                if SECRET_NAME.search(env["name"]):
                    assert "secretKeyRef" in env["valueFrom"], env["name"]
                elif env["name"].endswith("URI") and "@" in env.get("value", ""):  # built from a Secret by the kubelet
                    assert re.match(r"postgresql://\w+:\$\(DB_PASSWORD\)@", env["value"]), env["name"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_no_manifest_holds_a_credential(name):
    manifests = _rendered(name)
    assert "Secret" not in {d["kind"] for d in manifests}  # every Secret is the user's
    for doc in manifests:
        for text in _strings(doc):
            for userinfo in re.findall(r"[a-z][\w+.-]*://([^/@\s\"]*)@", text):  # a URI's user:password@
                assert userinfo.endswith(":$(DB_PASSWORD)"), (doc["kind"], text)
            assert not re.search(r"(?i)(password|secret_key|access_key)\s*[=:]\s*[^\s$]", text), (doc["kind"], text)


def test_the_auth_database_is_prepared_once_before_the_server_starts():
    deployment = _one(_rendered("default"), "Deployment", "caopd-mlflow")
    [init] = deployment["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["python", "-m", "caopd.tracking.server_app"]  # server_app.prepare()
    server_env = _env(_container(deployment))
    assert {name: server_env[name] for name in _env(init) if name != "HOME"} == \
        {name: value for name, value in _env(init).items() if name != "HOME"}  # the server's settings, the same
    assert {"CAOPD_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "DB_PASSWORD"} <= set(_env(init))
    assert "initContainers" not in _one(_rendered("no-auth"), "Deployment", "caopd-mlflow")["spec"]["template"][
        "spec"]


def test_default_install_runs_mlflow_on_postgresql_with_s3_artifacts():
    manifests = _rendered("default")
    container = _container(_one(manifests, "Deployment", "caopd-mlflow"))
    assert container["command"][:2] == ["mlflow", "server"] and "s3://caopd/mlflow" in container["command"]
    backend = _env(container)["BACKEND_STORE_URI"]["value"]
    assert backend.startswith("postgresql://mlflow:$(DB_PASSWORD)@caopd-postgresql:5432/")
    assert [s["metadata"]["name"] for s in manifests if s["kind"] == "StatefulSet"] == ["caopd-postgresql"]
    role = _one(manifests, "Role")
    trainjobs = next(r for r in role["rules"] if "trainjobs" in r["resources"])
    assert {"create", "watch", "delete"} <= set(trainjobs["verbs"])
    binding = _one(manifests, "RoleBinding")
    assert binding["subjects"][0]["name"] == _one(manifests, "ServiceAccount")["metadata"]["name"]
    cron = _one(manifests, "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cron["spec"]["schedule"] == "0 3 * * 0" and pod["containers"][0]["command"][:2] == ["caopd", "submit"]
    assert "http://caopd-mlflow.ml.svc.cluster.local:5000" in " ".join(pod["containers"][0]["command"])
    token = pod["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "pipelines.kubeflow.org"  # where `caopd submit` finds its KFP token


def test_the_server_answers_the_host_names_its_clients_use():
    # MLflow refuses a Host header it does not list (DNS rebinding); /health, the probes' path, is exempt
    command = _container(_one(_rendered("default"), "Deployment", "caopd-mlflow"))["command"]
    hosts = _option(command, "--allowed-hosts").split(",")
    assert "caopd-mlflow.ml.svc.cluster.local:5000" in hosts  # the tracking URI the pipeline and the jobs get
    assert {"caopd-mlflow:5000", "localhost:*"} <= set(hosts)  # a client in the namespace; kubectl port-forward
    assert "--cors-allowed-origins" not in command
    command = _container(_one(_rendered("every-identity"), "Deployment", "caopd-mlflow"))["command"]
    assert "mlflow.example.com" in _option(command, "--allowed-hosts").split(",")
    assert _option(command, "--cors-allowed-origins") == "https://mlflow.example.com"


def test_the_authenticated_server_runs_caopds_app_with_a_config_mlflow_reads(tmp_path, monkeypatch):
    manifests = _rendered("default")
    deployment = _one(manifests, "Deployment", "caopd-mlflow")
    container = _container(deployment)
    assert container["image"] == "ghcr.io/caopd/caopd-mlflow:0.1.0"  # images/mlflow/Dockerfile, the appVersion
    assert _option(container["command"], "--app-name") == AUTH_APP_NAME == "caopd-auth"
    env = _env(container)
    # the ini is the ConfigMap, mounted where MLFLOW_AUTH_CONFIG_PATH points
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = _one(manifests, "ConfigMap", volume["configMap"]["name"])
    ini = config_map["data"][config_path.name]
    parser = configparser.ConfigParser()
    parser.read_string(ini)
    assert "admin_password" not in parser["mlflow"] and "@" not in parser["mlflow"]["database_uri"]
    # MLflow's own reader: the admin from the environment, the rest from the file
    from mlflow.server.auth.config import read_auth_config

    (tmp_path / config_path.name).write_text(ini)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / config_path.name))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "admin-from-secret")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-secret-too")
    config = read_auth_config()
    assert config.default_permission == "NO_PERMISSIONS" and config.admin_username == "admin-from-secret"
    assert config.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"
    assert config.auth_cache_ttl_seconds == 60 and config.grant_default_workspace_access is False
    # the auth database is the tracking store's; the admin, the CSRF key and the protected aliases by reference
    assert env[server_app.AUTH_DATABASE_ENV]["value"] == env["BACKEND_STORE_URI"]["value"]
    refs = {name: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for name, e in env.items() if "valueFrom" in e}
    assert refs["MLFLOW_AUTH_ADMIN_USERNAME"] == ("caopd-mlflow-admin", "username")
    assert refs["MLFLOW_AUTH_ADMIN_PASSWORD"] == ("caopd-mlflow-admin", "password")
    assert refs["MLFLOW_FLASK_SERVER_SECRET_KEY"] == ("caopd-mlflow-admin", "flask-secret-key")
    monkeypatch.setenv(server_app.PROTECTED_ALIASES_ENV, env[server_app.PROTECTED_ALIASES_ENV]["value"])
    assert server_app.protected_aliases() == frozenset(PROTECTED_ALIASES) == {"champion"}
    # a changed config rolls the pods
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/auth-config"])


def test_auth_settings_reach_the_server():
    manifests = _rendered("every-identity")
    env = _env(_container(_one(manifests, "Deployment", "caopd-mlflow")))
    assert env[server_app.PROTECTED_ALIASES_ENV]["value"] == "champion,production"
    parser = configparser.ConfigParser()
    parser.read_string(_one(manifests, "ConfigMap")["data"]["basic_auth.ini"])
    assert parser.getint("mlflow", "auth_cache_ttl_seconds") == 0
    # another database for users and permissions, from its own Secret
    manifests = _render({**WITH_EXTERNAL_DATABASE, "mlflow": {"auth": {"databaseSecret": "mlflow-auth-db"}}})
    env = _env(_container(_one(manifests, "Deployment", "caopd-mlflow")))
    assert env[server_app.AUTH_DATABASE_ENV]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth-db", "key": "uri"}
    assert env["BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}


def test_an_external_database_holds_the_auth_tables_too():
    env = _env(_container(_one(_rendered("external-db"), "Deployment", "caopd-mlflow")))
    assert env[server_app.AUTH_DATABASE_ENV]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    assert "DB_PASSWORD" not in env


def test_without_auth_the_server_runs_as_before():
    manifests = _rendered("no-auth")
    container = _container(_one(manifests, "Deployment", "caopd-mlflow"))
    assert "--app-name" not in container["command"]
    assert not [name for name in _env(container) if "AUTH" in name or name.startswith("CAOPD_")]
    assert not [d for d in manifests if d["kind"] in ("ConfigMap", "Job")]
    policy = _one(manifests, "NetworkPolicy", "caopd-mlflow")
    components = [p["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
                  for p in policy["spec"]["ingress"][0]["from"]]
    assert "mlflow-bootstrap" not in components


def test_the_defaults_name_what_the_pipeline_uses():
    auth = _values()["mlflow"]["auth"]
    assert auth["pipelineSecret"] == PIPELINE_CREDENTIALS_SECRET  # the Secret the compiled pipeline's pods read
    assert auth["experiment"] == TrackingConfig().experiment
    assert auth["registeredModel"] == RegisterConfig.model_fields["name"].default
    assert auth["protectedAliases"] == list(PROTECTED_ALIASES)
    assert auth["enabled"] is True and auth["defaultPermission"] == "NO_PERMISSIONS"


def _bootstrap(manifests):
    job = _one(manifests, "Job")
    return job, job["spec"]["template"]["spec"]


def test_the_bootstrap_job_runs_after_install_and_upgrade_as_the_admin():
    job, pod = _bootstrap(_rendered("default"))
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    assert 1 <= job["spec"]["backoffLimit"] <= 5
    [container] = pod["containers"]
    assert container["image"] == "ghcr.io/caopd/caopd-cpu:0.1.0"
    command = container["command"]
    assert command[:2] == ["caopd", "bootstrap-auth"]
    assert _option(command, "--tracking-uri") == "http://caopd-mlflow.ml.svc.cluster.local:5000"
    assert (_option(command, "--experiment"), _option(command, "--model")) == ("caopd", "caopd-tiny")
    assert float(_option(command, "--connect-timeout-s")) >= 60  # a first install starts the server meanwhile
    assert "--reader-credentials" not in command and "--promoter-credentials" not in command
    env = _env(container)
    assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "caopd-mlflow-admin",
                                                                            "key": "username"}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "caopd-mlflow-admin",
                                                                            "key": "password"}
    # like the CronJob: read-only root, HOME on an emptyDir, no API token
    assert env["HOME"]["value"] == "/tmp" and container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]] and pod["automountServiceAccountToken"] is False


def test_the_bootstrap_job_mounts_each_identitys_secret_where_its_command_looks():
    job, pod = _bootstrap(_rendered("every-identity"))
    [container] = pod["containers"]
    command = container["command"]
    assert (_option(command, "--experiment"), _option(command, "--model")) == ("support-bot", "support-bot-8b")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secrets = {}
    for role in ("pipeline", "reader", "promoter"):
        folder = _option(command, f"--{role}-credentials")
        assert mounts[folder]["readOnly"] is True
        secret = volumes[mounts[folder]["name"]]["secret"]
        assert [item["key"] for item in secret["items"]] == ["username", "password"]  # nothing else of the Secret
        assert [item["path"] for item in secret["items"]] == ["username", "password"]  # the files the CLI reads
        secrets[role] = secret["secretName"]
    assert secrets == {"pipeline": "caopd-mlflow-pipeline", "reader": "caopd-mlflow-reader",
                       "promoter": "release-bot"}
    # the command is one the CLI takes
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.pipeline_credentials, args.connect_timeout_s) == (
        "bootstrap-auth", _option(command, "--pipeline-credentials"), 240.0)


def test_the_cronjob_passes_the_experiment_and_the_registered_model():
    command = _container(_one(_rendered("default"), "CronJob"))["command"]
    params = [command[i + 1] for i, arg in enumerate(command) if arg == "--param"]
    # `caopd submit` takes them, and the compiled pipeline has these parameters of these types
    assert build_parser().parse_args(command[1:]).param == params
    assert parse_params(params, pipeline_parameters(COMPILED_PIPELINE))["model_name"] == "caopd-tiny"
    [settings] = [json.loads(p.split("=", 1)[1]) for p in params if p.startswith("mlflow_settings=")]
    assert settings == {"tracking_uri": "http://caopd-mlflow.ml.svc.cluster.local:5000", "experiment": "caopd",
                        "artifact_root": "s3://caopd/mlflow"}
    assert [p for p in params if p.startswith("model_name=")] == ["model_name=caopd-tiny"]
    # a model_name among retraining.parameters is passed once
    command = _container(_one(_rendered("every-identity"), "CronJob"))["command"]
    params = [command[i + 1] for i, arg in enumerate(command) if arg == "--param"]
    assert [p for p in params if p.startswith("model_name=")] == ["model_name=support-bot-8b"]
    assert json.loads(next(p for p in params if p.startswith("mlflow_settings=")).split("=", 1)[1])[
        "experiment"] == "support-bot"
    # ... and must be the model the bootstrap granted the pipeline, which may create no other (caopd-auth)
    with pytest.raises(Exception, match="retraining.parameters.model_name \"canary\" differs from "
                                        "mlflow.auth.registeredModel \"caopd-tiny\""):
        _render({"retraining": {"parameters": {"model_name": "canary"}}})
    command = _container(_one(_render({"mlflow": {"auth": {"enabled": False}},
                                       "retraining": {"parameters": {"model_name": "canary"}}}), "CronJob"))["command"]
    assert "model_name=canary" in command


def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def _pod_labels(manifests) -> dict[str, dict]:
    """The labels of each workload's pods, by component."""
    return {t["metadata"]["labels"]["app.kubernetes.io/component"]: t["metadata"]["labels"]
            for _, t in _pod_templates(manifests)}


@pytest.mark.parametrize("name", ["default", "every-identity"])
def test_network_policies_admit_only_the_listed_peers(name):
    manifests = _rendered(name)
    pods = _pod_labels(manifests)
    policies = {d["metadata"]["name"]: d["spec"] for d in manifests if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"caopd-mlflow", "caopd-postgresql"}
    for spec in policies.values():
        assert spec["policyTypes"] == ["Ingress"] and len(spec["ingress"]) == 1
    # PostgreSQL: only the MLflow server's pods, on 5432
    postgresql = policies["caopd-postgresql"]
    assert [c for c, labels in pods.items() if _selects(postgresql["podSelector"], labels)] == ["postgresql"]
    [rule] = postgresql["ingress"]
    [peer] = rule["from"]
    assert set(peer) == {"podSelector"} and [c for c, labels in pods.items()
                                             if _selects(peer["podSelector"], labels)] == ["mlflow"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
    # MLflow: on its port, the pipeline's task pods, the CronJob's and the bootstrap Job's pods, the UI ingress
    mlflow = policies["caopd-mlflow"]
    assert [c for c, labels in pods.items() if _selects(mlflow["podSelector"], labels)] == ["mlflow"]
    [rule] = mlflow["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    runner, *local = rule["from"]
    kfp_task = {"pipelines.kubeflow.org/v2_component": "true", "pipeline/runid": "0d5a"}  # as KFP v2 labels them
    assert _selects(runner["podSelector"], kfp_task) and not _selects(runner["podSelector"], pods["mlflow"])
    in_namespace = [p for p in local if set(p) == {"podSelector"}]  # peers of the release's own namespace
    assert sorted(c for p in in_namespace for c, labels in pods.items()
                  if _selects(p["podSelector"], labels)) == ["mlflow-bootstrap", "retraining"]
    ingress = [p for p in local if "namespaceSelector" in p]
    if name == "default":
        assert runner["namespaceSelector"] == {} and ingress == []  # task pods in any namespace; no UI peer
    else:
        assert runner["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "team-ml"}}
        assert ingress == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}]


def test_network_policies_cover_only_what_the_chart_deploys():
    assert not [d for d in _rendered("existing") if d["kind"] == "NetworkPolicy"]
    policies = [d["metadata"]["name"] for d in _rendered("external-db") if d["kind"] == "NetworkPolicy"]
    assert policies == ["caopd-mlflow"]
    manifests = _render({"networkPolicy": {"enabled": False}, "retraining": {"enabled": False}})
    assert not [d for d in manifests if d["kind"] == "NetworkPolicy"]
    manifests = _render({"retraining": {"enabled": False}})
    mlflow = _one(manifests, "NetworkPolicy", "caopd-mlflow")
    assert "retraining" not in json.dumps(mlflow["spec"])


def test_existing_services_deploy_no_server_and_the_cron_points_at_them():
    manifests = _rendered("existing")
    assert {d["kind"] for d in manifests} == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    command = _container(_one(manifests, "CronJob"))["command"]
    assert any("https://mlflow.example.com" in arg for arg in command)
    assert "base_model=Qwen/Qwen3-8B" in command and "steps=500" in command


def test_the_workspace_is_a_kept_read_write_many_claim_that_the_step_may_adopt_jobs_from():
    manifests = _rendered("workspace")
    claim = _one(manifests, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "caopd-workspace"  # the name `caopd compile --workspace-pvc` is given
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs-client"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Ti"
    assert not [d for d in _rendered("default") if d["kind"] == "PersistentVolumeClaim"]
    role = _one(manifests, "Role")
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
    ({"mlflow": {"auth": {"defaultPermission": "ALL"}}}, "/mlflow/auth/defaultPermission': value must be one of"),
    # MLflow raises every grant to the default: EDIT would let the reader write, MANAGE the pipeline crown
    ({"mlflow": {"auth": {"defaultPermission": "MANAGE"}}}, "/mlflow/auth/defaultPermission': value must be one of"),
    ({"networkPolicy": {"egress": {}}}, "/networkPolicy': additional properties 'egress' not allowed"),
    ({"mlflow": {"auth": {"adminSecret": "MLflow-Admin"}}}, "/mlflow/auth/adminSecret'"),
    ({"mlflow": {"auth": {"promoter": {"secret": "release_bot"}}}}, "/mlflow/auth/promoter/secret'"),
    ({"mlflow": {"auth": {"credentialCacheSeconds": -1}}}, "/mlflow/auth/credentialCacheSeconds': minimum"),
    ({"mlflow": {"auth": {"protectedAliases": ["champion", "champion"]}}}, "/mlflow/auth/protectedAliases'"),
    ({"mlflow": {"auth": {"bootstrap": {"connectTimeoutSeconds": 0}}}}, "/mlflow/auth/bootstrap/connectTimeoutSeconds"),
    ({"mlflow": {"allowedOrigins": ["mlflow.example.com"]}}, "/mlflow/allowedOrigins/0'"),
    # no pod label would admit every pod (Helm drops a default key set to null)
    ({"networkPolicy": {"pipelineRunner": {"podLabels": {"pipelines.kubeflow.org/v2_component": None}}}},
     "/networkPolicy/pipelineRunner/podLabels': minProperties"),
    ({"networkPolicy": {"uiIngress": {"enabled": True, "namespaceLabels": {"kubernetes.io/metadata.name": None},
                                      "podLabels": {"app.kubernetes.io/name": None}}}}, "/networkPolicy/uiIngress'"),
    ({"networkPolicy": {"uiIngress": {"podLabels": {"app": "not a label value"}}}},
     "/networkPolicy/uiIngress/podLabels/app'"),
])
def test_a_bad_values_file_fails_the_schema_naming_the_key(values, message):
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(message)):
        _render(values)


def test_every_key_in_values_yaml_has_a_comment():
    # helm-docs' convention: the comment block right above a key starts with `# --` (and may go on with `#` lines)
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][\w./-]*:", line):
            above = number - 1
            while above >= 0 and lines[above].lstrip().startswith("#") and not lines[above].lstrip().startswith("# --"):
                above -= 1
            assert above >= 0 and lines[above].lstrip().startswith("# --"), (
                f"values.yaml line {number + 1}: {line.strip()} has no comment")
