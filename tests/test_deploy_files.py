"""The deployment files, checked as files: docker-compose.yml, deploy/ and the operator docs.

No Docker engine or Kubernetes cluster runs here, so these tests hold the files to the
contracts that the code defines: the CLI names, the Settings names (every environment
variable a service sets must be one the Settings object reads), the GPU reservations, the
broker's consumer timeout, the metric names the dashboard plots.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from inference_server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

# `inference-server <command>` names from DESIGN.md (contract).
CLI_COMMANDS = {"migrate", "api", "worker", "workers", "dispatcher", "keys", "models", "generate", "up"}
CLI_COMMANDS |= {"ingress", "tenants"}  # Round 2 contracts
# Variables our services set that a library reads rather than Settings (boto3's credentials).
LIBRARY_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
REQUIRED_SERVICES = {
    "rabbitmq",
    "postgres",
    "minio",
    "createbuckets",
    "migrate",
    "api",
    "worker-gpu0",
    "worker-gpu1",
    "dispatcher",
    "flower",
}
DASHBOARD_METRICS = {
    "inference_jobs_submitted_total",
    "inference_jobs_finished_total",
    "inference_job_duration_seconds",
    "inference_webhook_deliveries_total",
    "inference_queue_oldest_job_age_seconds",
    "inference_worker_busy_seconds_total",
    "inference_gpu_memory_allocated_bytes",
    "engine_pipeline_cache_bytes",
}
RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_MS = 30 * 60 * 1000
FAMILY = re.compile(r"^[a-z0-9][a-z0-9-]*$")

Docs = list[tuple[str, dict[str, Any]]]  # (file name, manifest) for every document under deploy/k8s


def settings_env_names() -> set[str]:
    """The environment variables Settings reads: field names upper-cased, or the field's alias."""
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias.upper() if isinstance(alias, str) else name.upper())
    return names


def option(command: list[str], flag: str) -> str:
    """The value after `flag` in an argv list (also accepts `--flag=value`)."""
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} missing from {command}")


def assert_contract_command(command: Any, where: str) -> None:
    assert isinstance(command, list), f"{where}: write the command as a list, got {command!r}"
    assert command[0] == "inference-server", f"{where}: {command}"
    assert command[1] in CLI_COMMANDS, f"{where}: {command[1]!r} is not a contract CLI command"
    if command[1] == "worker":
        families = option(command, "--families").split(",")
        assert families and all(FAMILY.match(f) for f in families), f"{where}: {families}"
        assert re.fullmatch(r"cuda:\d+|cpu", option(command, "--device")), f"{where}: {command}"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run our image (they build deploy/Dockerfile)."""
    found = {
        name: svc
        for name, svc in compose["services"].items()
        if isinstance(svc.get("build"), dict) and svc["build"].get("dockerfile") == "deploy/Dockerfile"
    }
    assert {"migrate", "api", "worker-gpu0", "worker-gpu1", "dispatcher"} <= set(found)
    return found


# --- docker-compose.yml ------------------------------------------------------------------


def test_compose_has_every_required_service_in_the_default_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= REQUIRED_SERVICES, REQUIRED_SERVICES - set(services)
    for name in REQUIRED_SERVICES:
        assert not services[name].get("profiles"), f"{name} must start with a plain `docker compose up`"


def test_each_gpu_worker_reserves_its_own_gpu_by_device_id(compose: dict[str, Any]) -> None:
    workers = {n: s for n, s in compose["services"].items() if re.fullmatch(r"worker-gpu\d+", n)}
    assert len(workers) >= 2
    for name, svc in workers.items():
        index = name.removeprefix("worker-gpu")
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        assert devices[0]["device_ids"] == [index], f"{name} must reserve GPU {index} only"
        assert "gpu" in devices[0]["capabilities"]
        assert "count" not in devices[0], "count and device_ids are exclusive"
        # The container sees only its reserved GPU, as device 0.
        assert option(svc["command"], "--device") == "cuda:0", name
        assert svc["volumes"] and any(v.split(":")[1] == "/models" for v in svc["volumes"]), name


def test_flower_watches_the_broker_and_its_management_api(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["image"].startswith("mher/flower")
    command = " ".join(flower["command"])
    assert "--broker=amqp://" in command and "@rabbitmq:5672" in command
    assert re.search(r"--broker_api=http://[^ ]+@rabbitmq:15672/api/", command), command


def test_rabbitmq_mounts_a_config_that_outlasts_the_longest_job(
    compose: dict[str, Any], app_services: dict[str, dict[str, Any]]
) -> None:
    rabbit = compose["services"]["rabbitmq"]
    major, minor = (int(x) for x in re.search(r":(\d+)\.(\d+)", rabbit["image"]).groups())
    assert (major, minor) >= (3, 13) and "management" in rabbit["image"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in rabbit["volumes"]}
    conf_target = mounts["./deploy/rabbitmq/rabbitmq.conf"]
    # The image reads /etc/rabbitmq/rabbitmq.conf and then conf.d/*.conf in order.
    assert conf_target == "/etc/rabbitmq/rabbitmq.conf" or conf_target.startswith("/etc/rabbitmq/conf.d/")
    assert mounts["./deploy/rabbitmq/enabled_plugins"] == "/etc/rabbitmq/enabled_plugins"

    conf = {}
    for line in (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = (p.strip() for p in line.split("=", 1))
            conf[key] = value
    timeout = int(conf["consumer_timeout"])
    assert timeout > RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_MS
    assert timeout >= Settings.model_fields["consumer_timeout_ms"].default
    for name, svc in app_services.items():
        declared = svc.get("environment", {}).get("CONSUMER_TIMEOUT_MS")
        assert declared is None or int(declared) <= timeout, f"{name} expects a longer broker timeout"

    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text().strip()
    assert re.fullmatch(r"\[[a-z_,\s]+\]\.", plugins), "enabled_plugins is an Erlang list ending with a dot"
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= {p.strip() for p in plugins[1:-2].split(",")}


def test_every_app_service_runs_a_contract_cli_command(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if svc.get("image", "").startswith("inference-server") or "build" in svc:
            assert_contract_command(svc.get("command"), f"compose service {name}")
    assert compose["services"]["migrate"]["command"] == ["inference-server", "migrate"]
    assert compose["services"]["dispatcher"]["command"] == ["inference-server", "dispatcher"]
    assert compose["services"]["api"]["command"][:2] == ["inference-server", "api"]


def test_app_environment_names_exist_in_settings_and_values_validate(
    app_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    known = settings_env_names() | LIBRARY_ENV
    for name, svc in app_services.items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: write environment as a mapping"
        unknown = set(env) - known
        assert not unknown, f"{name} sets variables Settings does not read: {sorted(unknown)}"
        # The values must also be what Settings accepts (production refuses SQLite, etc.).
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, str(value))
            settings = Settings()
        assert settings.environment == "production" and settings.database_url.startswith("postgresql")
        assert settings.storage_url.startswith("s3://") and settings.s3_endpoint_url
        assert str(settings.models_file).startswith("/models/")
    assert app_services["api"]["environment"]["API_HOST"] == "0.0.0.0"


def test_startup_order_uses_health_and_completion_conditions(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("api", "worker-gpu0", "worker-gpu1", "dispatcher"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["rabbitmq"]["condition"] == "service_healthy", name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep, spec in deps.items() if isinstance(deps, dict) else []:
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "models" in compose["volumes"]


# --- Dockerfile, Prometheus, Grafana -----------------------------------------------------


def test_dockerfile_is_multi_stage_and_installs_gpu_extra_only_for_cuda() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert re.search(r'if \[ "\$\{TORCH_VARIANT\}" = "cpu" \]; then\s*\\\s*pip install (-e )?\. ;', text)
    assert re.search(r'else\s*\\\s*pip install (-e )?"\.\[gpu\]"', text)
    # `inference-server migrate` finds migrations/ beside the package: the image must keep them there.
    assert "import inference_server.migrate" in text
    for path in (
        "pyproject.toml",
        "alembic.ini",
        "migrations",
        "inference_server",
        "api",
        "workers",
        "webhooks",
    ):
        assert re.search(rf"^COPY (\S+ )*{re.escape(path)} ", text, re.M), f"the image needs {path}"


def scrape_targets() -> dict[str, str]:
    """``host:port`` → metrics path for every target of prometheus.yml (static or DNS-discovered)."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    paths = {}
    for job in config["scrape_configs"]:
        targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        targets += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        for target in targets:
            paths[target] = job.get("metrics_path", "/metrics")
    return paths


def test_prometheus_scrapes_every_process_where_it_serves_metrics(compose: dict[str, Any]) -> None:
    paths = scrape_targets()
    env = compose["x-app-env"]
    assert paths["api:8000"] == "/metrics"
    assert paths["dispatcher:" + env["DISPATCHER_METRICS_PORT"]] == "/metrics"
    workers = [n for n in compose["services"] if n.startswith("worker-")]
    assert len(workers) >= 3
    for name in workers:
        assert paths[f"{name}:{env['WORKER_METRICS_PORT']}"] == "/metrics", name
    assert paths["rabbitmq:15692"].startswith("/metrics")
    assert paths["flower:5555"] == "/metrics"
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


def test_grafana_dashboard_plots_the_agreed_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in DASHBOARD_METRICS:
        assert metric in exprs, metric
    assert "inference_job_duration_seconds_bucket" in exprs, "duration is a histogram: plot quantiles"
    assert "by (status)" in exprs and "by (outcome)" in exprs
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for name in ("datasources/prometheus.yml", "dashboards/inference-server.yml"):
        assert yaml.safe_load((DEPLOY / "grafana" / "provisioning" / name).read_text())["apiVersion"] == 1


# --- Kubernetes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_docs() -> Docs:
    docs = []
    files = sorted(K8S.glob("*.yaml"))
    assert files
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: empty or non-mapping document"
            docs.append((path.name, doc))
    return docs


def by_kind(docs: Docs, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in docs if d["kind"] == kind}


def test_every_manifest_parses_and_is_namespace_agnostic(k8s_docs: Docs) -> None:
    for filename, doc in k8s_docs:
        assert doc.get("apiVersion") and doc.get("kind"), filename
        if doc["kind"] == "Kustomization":
            assert "namespace" not in doc
            for resource in doc["resources"]:
                assert (K8S / resource).is_file(), f"kustomization lists missing {resource}"
            assert "secret.example.yaml" not in doc["resources"]
            continue
        assert doc["metadata"].get("name"), filename
        assert "namespace" not in doc["metadata"], f"{filename}: {doc['metadata']['name']} pins a namespace"


def test_manifest_containers_run_contract_commands_with_known_settings(
    k8s_docs: Docs,
) -> None:
    known = settings_env_names() | LIBRARY_ENV
    for name, cm in by_kind(k8s_docs, "ConfigMap").items():
        assert set(cm["data"]) <= known, f"ConfigMap {name}: {sorted(set(cm['data']) - known)}"
    secret = by_kind(k8s_docs, "Secret")["inference-server-secrets"]
    assert set(secret["stringData"]) <= known
    pods = [
        (n, d["spec"]["template"]["spec"])
        for n, d in {**by_kind(k8s_docs, "Deployment"), **by_kind(k8s_docs, "Job")}.items()
    ]
    assert len(pods) >= 4
    for name, pod in pods:
        # Third-party images (Flower's) run their own commands: tests/test_deploy_flower.py checks it.
        for container in (c for c in pod["containers"] if c["image"].startswith("inference-server")):
            assert_contract_command(container["command"], f"{name}/{container['name']}")
            for env in container.get("env", []):
                assert env["name"] in known, f"{name}: {env['name']}"


def test_workers_take_one_gpu_and_wait_for_the_running_job(k8s_docs: Docs) -> None:
    workers = {n: d for n, d in by_kind(k8s_docs, "Deployment").items() if "worker" in n}
    assert workers
    for deployment in workers.values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 1800, "a running job must be able to finish"
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert option(container["command"], "--device") == "cuda:0"


def test_keda_scales_each_worker_on_the_queues_of_its_families(k8s_docs: Docs) -> None:
    deployments = by_kind(k8s_docs, "Deployment")
    scaled = by_kind(k8s_docs, "ScaledObject")
    auths = by_kind(k8s_docs, "TriggerAuthentication")
    workers = {n for n in deployments if "worker" in n}
    assert workers and workers == {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()}
    for obj in scaled.values():
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        command = target["spec"]["template"]["spec"]["containers"][0]["command"]
        families = set(option(command, "--families").split(","))
        modes: dict[str, set[str]] = {}
        ages = []
        for trigger in obj["spec"]["triggers"]:
            if trigger["type"] == "prometheus":  # queue age: not something the RabbitMQ scaler reads
                ages.append(trigger["metadata"]["query"])
                continue
            assert trigger["type"] == "rabbitmq"
            assert trigger["metadata"]["protocol"] == "http", "MessageRate needs the management API"
            assert trigger["authenticationRef"]["name"] in auths
            modes.setdefault(trigger["metadata"]["queueName"], set()).add(trigger["metadata"]["mode"])
        assert set(modes) == {f"jobs.{f}" for f in families}
        assert all(m == {"QueueLength", "MessageRate"} for m in modes.values()), modes
        (age,) = ages
        assert "inference_queue_oldest_job_age_seconds" in age
        assert set(re.search(r'family=~"([^"]+)"', age).group(1).split("|")) == families


def test_api_scales_on_cpu_and_probes_health_and_readiness(k8s_docs: Docs) -> None:
    api = by_kind(k8s_docs, "Deployment")["inference-server-api"]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    (hpa,) = by_kind(k8s_docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "inference-server-api"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    service = by_kind(k8s_docs, "Service")["inference-server-api"]
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    (job,) = by_kind(k8s_docs, "Job").values()
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["inference-server", "migrate"]


# --- docs ----------------------------------------------------------------------------------


def test_configuration_doc_lists_every_setting() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(n for n in settings_env_names() if f"`{n}`" not in text)
    assert not missing, f"docs/configuration.md does not document {missing}"


def test_deploy_doc_covers_the_operator_topics() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text().lower()
    for topic in (
        "docker compose up",
        "consumer_timeout",
        "inference-server migrate",
        "keda",
        "terminationgraceperiodseconds",
        "secret",
        "models_file",
    ):
        assert topic in text, topic


# --- Kubernetes, as kustomize renders it ---------------------------------------------------


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is required to render deploy/k8s (kubectl kustomize works offline)"
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")
    }


def test_kustomize_images_rewrite_every_image_the_migrate_job_included(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = yaml.safe_load((copy / "kustomization.yaml").read_text())
    # What `kustomize edit set image inference-server=... inference-server-cuda=...` writes.
    kustomization["images"] = [
        {"name": "inference-server", "newName": "registry.example/inference-server", "newTag": "1.2.3"},
        {
            "name": "inference-server-cuda",
            "newName": "registry.example/inference-server",
            "newTag": "1.2.3-cuda",
        },
    ]
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    pods = pod_specs(kustomize(copy))
    assert "Job/inference-server-migrate" in pods
    for name, pod in pods.items():
        for container in pod.get("initContainers", []) + pod["containers"]:
            image = container["image"]
            if not image.startswith("inference-server") and "/inference-server" not in image:
                continue  # a third-party image (Flower's) keeps its own name
            assert image.startswith("registry.example/inference-server:1.2.3"), (name, container)
    workers = [p for n, p in pods.items() if "worker" in n]
    assert workers and all(p["containers"][0]["image"].endswith("-cuda") for p in workers)


def test_every_rendered_container_gets_the_public_api_url() -> None:
    docs = kustomize(K8S)
    config = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for name, pod in pod_specs(docs).items():
        for container in pod["containers"]:
            if "inference-server" not in container["image"]:
                continue  # Flower's own image builds no URL
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    env = {**config[source["configMapRef"]["name"]], **env}
            assert re.match(r"https?://", env.get("API_URL") or ""), f"{name}: no API_URL"
            assert "0.0.0.0" not in env["API_URL"], name
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "API_URL" in compose["x-app-env"]


def test_every_family_group_has_a_worker_deployment_and_a_scaled_object(
    tiny_registry_families: set[str],
) -> None:
    docs = kustomize(K8S)
    deployments = {
        d["metadata"]["name"]: d
        for d in docs
        if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"]
    }
    scaled = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "ScaledObject"}
    assert set(deployments) == scaled
    served = set()
    for deployment in deployments.values():
        served |= set(
            option(deployment["spec"]["template"]["spec"]["containers"][0]["command"], "--families").split(
                ","
            )
        )
    assert served == tiny_registry_families, "every family of the registry has workers"


@pytest.fixture(scope="module")
def tiny_registry_families() -> set[str]:
    """The families `inference-server models tiny` writes: every family the engine knows."""
    from inference_server.engine.tiny.build import FAMILIES

    return set(FAMILIES)


def test_docs_state_the_rabbitmq_version_the_code_requires() -> None:
    from inference_server.publish.broker_version import PER_QUEUE_CONSUMER_TIMEOUT

    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "3.13+" not in text
    assert "3.10" in text and "{}.{}".format(*PER_QUEUE_CONSUMER_TIMEOUT) in text
