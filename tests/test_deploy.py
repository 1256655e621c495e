"""The production files under deploy/: everything that can be checked without Docker or Kubernetes.

- every YAML parses;
- deploy/dagster.yaml loads as a Dagster instance on a real PostgreSQL (the session's server, a fresh
  database) with Postgres run/event/schedule storage, the queued coordinator, the limits and the pool;
- deploy/workspace.grpc.yaml validates against Dagster's workspace schema;
- deploy/helm/values.yaml uses only keys that the official chart's values schema defines (the chart's
  schema models, dagster-io/dagster helm/dagster/schema, recorded below: the chart itself cannot be
  downloaded here, so this is a key check, not `helm lint`);
- deploy/requirements.lock pins exactly what pyproject.toml pins and what this environment runs, and
  (slow, needs PyPI) resolves with `pip install --dry-run` like the Dockerfile's install step;
- deploy/env.example defines every variable the configs read and only RAG_* variables Settings knows.

Not run here: `docker build` (no Docker engine) and `helm install` / a cluster (no Kubernetes).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _load(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


def _env_refs(obj) -> set[str]:
    """Names in ``{env: NAME}`` references anywhere in a parsed YAML document."""
    out: set[str] = set()
    if isinstance(obj, dict):
        if set(obj) == {"env"} and isinstance(obj["env"], str):
            return {obj["env"]}
        for v in obj.values():
            out |= _env_refs(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= _env_refs(v)
    return out


def _env_example() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def test_yaml_files_parse():
    for name in ("dagster.yaml", "workspace.grpc.yaml", "helm/values.yaml"):
        assert isinstance(_load(name), dict), name


def _pg_env(url: str) -> dict[str, str]:
    """DAGSTER_PG_* for a server URL; a socket-only server (no host) goes through PGHOST."""
    u = urlsplit(url)
    sock = parse_qs(u.query).get("host", [""])[0]
    return {
        "DAGSTER_PG_HOST": u.hostname or "",
        "DAGSTER_PG_PORT": str(u.port or 5432),
        "DAGSTER_PG_USER": u.username or "postgres",
        "DAGSTER_PG_PASSWORD": u.password or "",
        "DAGSTER_PG_DB": u.path.lstrip("/"),
        **({"PGHOST": sock} if sock and not u.hostname else {}),
    }


def test_dagster_yaml_loads_as_postgres_instance(make_db, tmp_path, monkeypatch):
    import dagster as dg
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    for k, v in _pg_env(make_db()).items():
        monkeypatch.setenv(k, v)
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert str(instance.run_storage._engine.url).startswith("postgresql+psycopg2://")
        coord = instance.run_coordinator
        assert isinstance(coord, QueuedRunCoordinator)
        assert coord.dequeue_use_threads and coord.dequeue_num_workers >= 2
        conc = instance.get_concurrency_config()
        assert conc.run_queue_config.max_concurrent_runs == 4
        assert conc.pool_config.default_pool_limit == 2
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert instance.run_monitoring_enabled
        assert not instance.telemetry_enabled
        # real writes: Dagster's tables were created, and the embedder pool gets the configured limit
        assert instance.get_runs() == []
        instance.event_log_storage.initialize_concurrency_limit_to_default("embedder")
        assert instance.event_log_storage.get_concurrency_info("embedder").slot_count == 2
    finally:
        instance.dispose()


def test_workspace_grpc_yaml_validates(monkeypatch):
    from dagster._config import process_config
    from dagster._config.field import resolve_to_config_type
    from dagster._core.workspace.config_schema import WORKSPACE_CONFIG_SCHEMA

    monkeypatch.setenv("DAGSTER_CODE_SERVER_HOST", "rag-assets")
    monkeypatch.setenv("DAGSTER_CODE_SERVER_PORT", "4000")
    cfg = _load("workspace.grpc.yaml")
    res = process_config(resolve_to_config_type(WORKSPACE_CONFIG_SCHEMA), cfg)
    assert res.success, res.errors
    (entry,) = res.value["load_from"]
    assert entry["grpc_server"] == {"host": "rag-assets", "port": 4000, "location_name": "rag_assets"}


# --- Helm values --------------------------------------------------------------------------------
# Allowed keys per path, from the chart's pydantic schema models (dagster-io/dagster, helm/dagster/schema/
# schema/charts/...: values.py, subschema/{global_,postgresql,webserver,run_launcher,daemon,concurrency,
# telemetry}.py, dagster_user_deployments/subschema/user_deployments.py). "*" = Kubernetes objects or
# free-form maps (not checked deeper). "[]" marks list items.
K8S = "*"
HELM_KEYS: dict[str, set[str] | str] = {
    "": {
        "dagsterWebserver",
        "dagster-user-deployments",
        "postgresql",
        "generatePostgresqlPasswordSecret",
        "generateCeleryConfigSecret",
        "rabbitmq",
        "redis",
        "flower",
        "ingress",
        "imagePullSecrets",
        "computeLogManager",
        "scheduler",
        "runLauncher",
        "pythonLogs",
        "dagsterDaemon",
        "busybox",
        "migrate",
        "telemetry",
        "serviceAccount",
        "global",
        "retention",
        "concurrency",
        "additionalInstanceConfig",
    },
    "global": {
        "postgresqlSecretName",
        "dagsterHome",
        "serviceAccountName",
        "celeryConfigSecretName",
        "dagsterInstanceConfigMap",
    },
    "postgresql": {
        "postgresqlScheme",
        "image",
        "enabled",
        "postgresqlHost",
        "postgresqlUsername",
        "postgresqlPassword",
        "postgresqlDatabase",
        "postgresqlParams",
        "service",
    },
    "postgresql.postgresqlParams": K8S,
    "postgresql.service": {"port"},
    "dagsterWebserver": {
        "dbStatementTimeout",
        "dbPoolRecycle",
        "logLevel",
        "schedulerName",
        "volumeMounts",
        "volumes",
        "pathPrefix",
        "replicaCount",
        "image",
        "nameOverride",
        "service",
        "workspace",
        "env",
        "envConfigMaps",
        "envSecrets",
        "deploymentLabels",
        "labels",
        "nodeSelector",
        "affinity",
        "tolerations",
        "podSecurityContext",
        "securityContext",
        "resources",
        "readinessProbe",
        "livenessProbe",
        "startupProbe",
        "annotations",
        "enableReadOnly",
    },
    "dagster-user-deployments": {"enabled", "enableSubchart", "imagePullSecrets", "deployments"},
    "dagster-user-deployments.deployments[]": {
        "name",
        "image",
        "port",
        "dagsterApiGrpcArgs",
        "codeServerArgs",
        "includeConfigInLaunchedRuns",
        "env",
        "envConfigMaps",
        "envSecrets",
        "annotations",
        "nodeSelector",
        "affinity",
        "tolerations",
        "podSecurityContext",
        "securityContext",
        "resources",
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "labels",
        "volumeMounts",
        "volumes",
        "schedulerName",
    },
    "dagster-user-deployments.deployments[].image": {"repository", "tag", "pullPolicy"},
    "dagster-user-deployments.deployments[].includeConfigInLaunchedRuns": {"enabled"},
    "runLauncher": {"type", "config"},
    "runLauncher.config": {"celeryK8sRunLauncher", "k8sRunLauncher", "customRunLauncher"},
    "runLauncher.config.k8sRunLauncher": {
        "image",
        "imagePullPolicy",
        "jobNamespace",
        "loadInclusterConfig",
        "kubeconfigFile",
        "envConfigMaps",
        "envSecrets",
        "envVars",
        "volumeMounts",
        "volumes",
        "labels",
        "failPodOnRunFailure",
        "resources",
        "schedulerName",
        "securityContext",
        "runK8sConfig",
    },
    "runLauncher.config.k8sRunLauncher.runK8sConfig": {
        "containerConfig",
        "podSpecConfig",
        "podTemplateSpecMetadata",
        "jobSpecConfig",
        "jobMetadata",
    },
    "dagsterDaemon": {
        "schedulerName",
        "volumeMounts",
        "volumes",
        "enabled",
        "image",
        "runCoordinator",
        "heartbeatTolerance",
        "env",
        "envConfigMaps",
        "envSecrets",
        "deploymentLabels",
        "labels",
        "nodeSelector",
        "affinity",
        "tolerations",
        "podSecurityContext",
        "securityContext",
        "resources",
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "annotations",
        "runMonitoring",
        "runRetries",
        "sensors",
        "schedules",
    },
    "dagsterDaemon.runCoordinator": {"enabled", "type", "config"},
    "dagsterDaemon.runCoordinator.config": {"queuedRunCoordinator", "customRunCoordinator"},
    "dagsterDaemon.runCoordinator.config.queuedRunCoordinator": {
        "maxConcurrentRuns",
        "tagConcurrencyLimits",
        "dequeueIntervalSeconds",
        "dequeueNumWorkers",
        "dequeueUseThreads",
    },
    # free-form in the schema; these are the keys the chart's configmap-instance.yaml template reads
    "dagsterDaemon.runRetries": {"enabled", "maxRetries"},
    "dagsterDaemon.runMonitoring": {
        "enabled",
        "startTimeoutSeconds",
        "maxResumeRunAttempts",
        "pollIntervalSeconds",
        "freeSlotsAfterRunEndSeconds",
    },
    "dagsterDaemon.sensors": {"numWorkers", "numSubmitWorkers", "useThreads"},
    "dagsterDaemon.schedules": {"numWorkers", "numSubmitWorkers", "useThreads"},
    "concurrency": {"enabled", "pools", "runs"},
    "concurrency.pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "concurrency.runs": {"maxConcurrentRuns", "tagConcurrencyLimits"},
    "concurrency.runs.tagConcurrencyLimits[]": {"key", "value", "limit"},
    "telemetry": {"enabled"},
}


def _unknown_keys(obj, path: str = "") -> list[str]:
    spec = HELM_KEYS.get(path)
    if spec == K8S or spec is None:
        return []  # a Kubernetes object or a leaf the schema types as such
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in spec:
                bad.append(f"{path or '<root>'}.{k}")
                continue
            child = f"{path}.{k}" if path else k
            if isinstance(v, list):
                for item in v:
                    bad += _unknown_keys(item, child + "[]")
            else:
                bad += _unknown_keys(v, child)
    return bad


def test_helm_values_use_only_chart_schema_keys():
    values = _load("helm/values.yaml")
    assert _unknown_keys(values) == []
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher" and "k8sRunLauncher" in launcher["config"]
    (dep,) = values["dagster-user-deployments"]["deployments"]
    assert dep["codeServerArgs"][:4] == ["-m", "rag_assets.definitions", "-a", "defs"]
    secret = dep["envSecrets"][0]["name"]
    assert {"name": secret} in launcher["config"]["k8sRunLauncher"]["envSecrets"]
    env = {e["name"]: e["value"] for e in dep["env"]}
    assert env["RAG_SNAPSHOT_URI"].startswith("s3://")
    assert values["postgresql"]["enabled"] is False
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    coord = values["dagsterDaemon"]["runCoordinator"]
    assert (
        coord["type"] == "QueuedRunCoordinator"
        and coord["config"]["queuedRunCoordinator"]["dequeueUseThreads"]
    )
    # with concurrency.enabled, run limits belong under concurrency.runs (a config error elsewhere)
    assert "maxConcurrentRuns" not in coord["config"]["queuedRunCoordinator"]
    assert values["concurrency"]["enabled"] and values["concurrency"]["pools"]["defaultLimit"] >= 1
    known = _settings_env_names() | {"DAGSTER_EVENT_BATCH_SIZE"}  # Dagster's own, read by the run pods
    assert set(env) <= known, set(env) - known


def test_helm_key_check_catches_a_typo():
    assert _unknown_keys(
        {"runLauncher": {"type": "K8sRunLauncher", "config": {"k8sRunLauncher": {"envSecret": []}}}}
    ) == ["runLauncher.config.k8sRunLauncher.envSecret"]


# --- image: Dockerfile and its pinned requirement set ---------------------------------------------


def _lock() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            assert ver, f"unpinned requirement in requirements.lock: {line}"
            out[name.lower().replace("_", "-")] = ver
    return out


def test_dockerfile_installs_the_pinned_set_and_starts_the_code_server():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "requirements.lock" in text and "pip install --no-deps -r" in text and "pip check" in text
    assert "pip install --no-deps ." in text
    cmd = json.loads(re.search(r"^CMD (\[.*?\])\s*$", text.replace("\\\n", " "), re.M | re.S).group(1))
    assert cmd[:3] == ["dagster", "code-server", "start"]
    assert cmd[cmd.index("-m") + 1] == "rag_assets.definitions" and cmd[cmd.index("-a") + 1] == "defs"
    assert "COPY deploy/dagster.yaml ${DAGSTER_HOME}/dagster.yaml" in text


def test_requirements_lock_matches_pyproject_and_this_environment():
    lock = _lock()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name, _, ver = re.sub(r"\[.*?\]", "", dep).partition("==")
        assert lock.get(name.lower()) == ver, (dep, lock.get(name.lower()))
    assert lock["dagster-k8s"].split(".")[-1] == lock["dagster"].split(".")[-1]  # 0.29.N with 1.13.N
    mismatched = {}
    for name, ver in lock.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # dagster-k8s and its client are image-only
        if have != ver:
            mismatched[name] = (ver, have)
    assert not mismatched, f"requirements.lock differs from the tested environment: {mismatched}"


@pytest.mark.slow
def test_requirements_lock_resolves_like_the_docker_install(tmp_path):
    """The Dockerfile's install step as a dry run: every pin exists and the set needs nothing else."""
    report = tmp_path / "report.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(DEPLOY / "requirements.lock"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if r.returncode != 0 and re.search(
        r"(?i)connection|resolve host|network is unreachable|timed out", r.stderr
    ):
        pytest.skip(f"package index unreachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    resolved = {
        i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert resolved == _lock(), {k: (resolved.get(k), v) for k, v in _lock().items() if resolved.get(k) != v}


# --- environment ---------------------------------------------------------------------------------


def _settings_env_names() -> set[str]:
    src = (REPO / "rag_assets" / "settings.py").read_text()
    return set(re.findall(r'"(RAG_[A-Z0-9_]+)"', src))


def test_env_example_covers_the_configs():
    env = _env_example()
    needed = _env_refs(_load("dagster.yaml")) | _env_refs(_load("workspace.grpc.yaml"))
    assert needed <= set(env), needed - set(env)
    rag = {k for k in env if k.startswith("RAG_")}
    assert rag <= _settings_env_names(), rag - _settings_env_names()
    for k in ("RAG_DATABASE_URL", "RAG_EMBEDDING_API_KEY", "RAG_SNAPSHOT_URI", "AWS_ACCESS_KEY_ID"):
        assert env.get(k), k
    assert env["RAG_SNAPSHOT_URI"].startswith("s3://")
    assert urlsplit(env["RAG_DATABASE_URL"]).scheme == "postgresql"


def test_ci_runs_exactly_the_readme_second_command():
    """`.ci/run` and the README's second command are one command: CI proves what the README promises."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    second = blocks[1].strip()
    ci = [ln for ln in (root / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [second]
    assert "local" not in second, "the README's test command must not pull PyTorch (the 'local' extra)"
