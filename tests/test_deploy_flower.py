"""Flower in Kubernetes, checked as files (no cluster here): deployed by the kustomization, wired
as in docker-compose.yml (the broker and the management API), its values taken from Secrets that
secret.example.yaml defines, and its Service reaching its pod; ``kubectl kustomize`` builds the
whole set with it when kubectl is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_the_kustomization_deploys_flower() -> None:
    (kustomization,) = docs("kustomization.yaml")
    assert "flower.yaml" in kustomization["resources"]


def test_flower_is_wired_to_the_broker_and_its_management_api_like_compose() -> None:
    deployment, service = docs("flower.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    compose = yaml.safe_load((K8S.parents[1] / "docker-compose.yml").read_text())["services"]["flower"]
    assert container["image"] == compose["image"]
    command = container["command"]
    assert command[:2] == ["celery", "--broker=$(BROKER_URL)"] and "flower" in command
    (broker_api,) = [a for a in command if a.startswith("--broker_api=")]
    assert broker_api == "--broker_api=$(RABBITMQ_MANAGEMENT_URL)api/"
    # Every $(VAR) the command uses comes from the container's env, and each from a Secret key
    # that secret.example.yaml defines (the optional basic-auth Secret aside).
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert set(re.findall(r"\$\((\w+)\)", " ".join(command))) <= set(env)
    secrets = {d["metadata"]["name"]: d["stringData"] for d in docs("secret.example.yaml")}
    for ref in env.values():
        if not ref.get("optional"):
            assert ref["key"] in secrets[ref["name"]], ref
    management = secrets["inference-server-rabbitmq-monitor"][env["RABBITMQ_MANAGEMENT_URL"]["key"]]
    assert re.fullmatch(r"http://[^@]+@[^/]+:15672/", management), management  # + "api/" = Flower's form


def test_the_flower_service_reaches_its_pod_and_probes_hit_flower() -> None:
    deployment, service = docs("flower.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"  # Flower can stop workers
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert f"--port={ports['http']}" in container["command"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_kubectl_builds_the_kustomization_with_flower() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # the checks above still hold the file to its contract
        pytest.fail("kubectl is not installed: the kustomization cannot be built")
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    kinds = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(built) if d}
    assert ("Deployment", "inference-server-flower") in kinds
    assert ("Service", "inference-server-flower") in kinds
