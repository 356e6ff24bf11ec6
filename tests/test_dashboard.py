"""Every Grafana panel has data, and every alert rule names metrics that exist, in a system like
the compose stack: an API, a worker and a dispatcher, each serving /metrics as compose has them
scraped (deploy/prometheus/prometheus.yml), after a few jobs with webhooks.

Two proofs. The first parses each panel's and each rule's PromQL for metric names and checks them
against the scrapes. The second, where the `prometheus` binary is installed (Debian's
`prometheus` package), runs a real Prometheus that scrapes the same processes and evaluates
every panel's queries: each must return at least one series. Rules are checked with `promtool`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inference_server.devtools.services import free_port
from tests.support.jobs import submit, wait_done
from tests.support.receiver import Receiver
from tests.support.system import Proc, start_api
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# Served only where NVML is (a GPU worker with nvidia-ml-py): absent on these CPU workers.
NVML_ONLY = {"inference_gpu_utilization_ratio"}
# Made by Prometheus itself, not by a scraped process.
PROMETHEUS_MADE = {"up"}
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names (inside ``{}`` or a ``by (...)``-style list), durations or strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if not rest.startswith("(") and match.group(0).lower() not in KEYWORDS:
            names.add(match.group(0))
    return names


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, family) (rate(a_seconds_bucket{x="y z"}[5m]))) '
        "/ on (family) group_left b_total or vector(0) and max without (q) (c)"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c"}


def panels() -> list[dict[str, Any]]:
    return json.loads(DASHBOARD.read_text())["panels"]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def api_key(system_db: Any) -> str:
    from api.auth import create_tenant_key

    with system_db() as session:
        return create_tenant_key(session, f"dashboard-{uuid.uuid4().hex[:8]}")[1]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def stack(system_env: dict[str, str], logs_dir: Path, worker: Proc) -> Iterator[dict[str, str]]:
    """The metrics URLs of an API, the suite's worker and a dispatcher with its metrics port,
    after three jobs with webhooks have run through them."""
    api, url = start_api(system_env, logs_dir, name="api-dashboard")
    port = free_port()
    dispatcher = Proc(
        "dispatcher-metrics", ["dispatcher"], dict(system_env, DISPATCHER_METRICS_PORT=str(port)), logs_dir
    )
    targets = {
        "api": f"{url}/metrics",
        "worker": str(worker.metrics_url),
        "dispatcher": f"http://127.0.0.1:{port}/metrics",
    }

    def serving() -> bool:
        if dispatcher.proc.poll() is not None:
            raise AssertionError(f"dispatcher exited:\n{dispatcher.tail()}")
        try:
            return requests.get(targets["dispatcher"], timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_for(serving, 60, interval=0.2, what="the dispatcher's metrics endpoint")
        yield targets
    finally:
        dispatcher.kill(15)
        api.kill(15)


def run_jobs(url: str, api_key: str, receiver_url: str, n: int = 3) -> None:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {api_key}"
    http.base_url = url  # type: ignore[attr-defined]
    body = {"family": "sd15", "prompt": "a kite", "width": 64, "height": 64, "steps": 2}
    jobs = [submit(http, {**body, "webhook": {"url": receiver_url}}) for _ in range(n)]
    for job in jobs:
        assert wait_done(http, job["id"])["status"] == "succeeded"


def scrape(url: str) -> set[str]:
    """The sample names (``_total``, ``_bucket`` ... included) that ``url`` serves with a value."""
    text = requests.get(url, timeout=10).text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture(scope="module")
def scraped(stack: dict[str, str], api_key: str, receiver: Receiver) -> dict[str, set[str]]:
    run_jobs(stack["api"].removesuffix("/metrics"), api_key, receiver.url)
    wait_for(lambda: len(receiver.types()) >= 3, 30, what="the jobs' webhooks")
    return {name: scrape(url) for name, url in stack.items()}


def test_every_panel_and_alert_reads_metrics_the_processes_serve(scraped: dict[str, set[str]]) -> None:
    served = set().union(*scraped.values())
    for panel in panels():
        exprs = [t["expr"] for t in panel["targets"]]
        names = [metric_names(e) for e in exprs]
        assert all(names), (panel["title"], exprs)
        missing = set().union(*names) - served - NVML_ONLY
        assert not missing, f"panel {panel['title']!r} reads {sorted(missing)}, which nothing serves"
        assert any(n <= served for n in names), f"panel {panel['title']!r} would have no data"
    for rule in alert_rules():
        missing = metric_names(rule["expr"]) - served - PROMETHEUS_MADE
        assert not missing, f"alert {rule['alert']} reads {sorted(missing)}, which nothing serves"
    # Where each family of metrics comes from, as prometheus.yml's comment says.
    assert {"inference_jobs_submitted_total", "inference_queue_oldest_job_age_seconds"} <= scraped["api"]
    assert {"inference_relay_published_messages_total", "inference_registry_families"} <= scraped["api"]
    assert {
        "inference_worker_busy_seconds_total",
        "inference_gpu_memory_allocated_bytes",
        "inference_gpu_memory_capacity_bytes",
        "engine_pipeline_cache_bytes",
        "inference_worker_families",
    } <= scraped["worker"]
    assert "inference_gpu_utilization_ratio" not in scraped["worker"], "a CPU worker has no NVML"
    assert {"inference_webhook_deliveries_total", "inference_relay_batch_seconds_bucket"} <= scraped[
        "dispatcher"
    ]


def test_alert_rules_are_valid() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "InferenceQueueTooOld",
        "InferenceFailedShareHigh",
        "InferenceNoWorkersForFamily",
        "InferenceWebhookBacklog",
    }
    for rule in rules:
        assert rule["expr"] and rule["for"] and rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (Debian package `prometheus`; .ci/run installs it)")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_real_prometheus_finds_data_for_every_panel(
    stack: dict[str, str], scraped: dict[str, set[str]], api_key: str, receiver: Receiver, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (Debian package `prometheus`; .ci/run installs it)")
    jobs = [
        {
            "job_name": f"inference-{name}",
            "scrape_interval": "1s",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [url.split("/")[2]]}],
        }
        for name, url in stack.items()
    ]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": jobs}))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:

        def query(expr: str) -> list[Any]:
            answer = requests.get(f"{base}/query", params={"query": expr}, timeout=5).json()
            assert answer["status"] == "success", (expr, answer)
            return answer["data"]["result"]

        def scraped_times(n: int) -> bool:
            try:
                counts = [query(f'count_over_time(up{{job="{j["job_name"]}"}}[5m])') for j in jobs]
            except requests.RequestException:
                return False
            return all(c and float(c[0]["value"][1]) >= n for c in counts)

        wait_for(lambda: scraped_times(2), 60, interval=0.5, what="Prometheus's first scrapes")
        run_jobs(stack["api"].removesuffix("/metrics"), api_key, receiver.url, n=2)
        seen = float(query('count_over_time(up{job="inference-worker"}[5m])')[0]["value"][1])
        wait_for(lambda: scraped_times(int(seen) + 3), 60, interval=0.5, what="scrapes after the jobs")
        assert all(float(r["value"][1]) == 1 for r in query("up")), query("up")
        for panel in panels():
            for target in panel["targets"]:
                if metric_names(target["expr"]) & NVML_ONLY:
                    continue
                assert query(target["expr"]), f"panel {panel['title']!r}: no data for {target['expr']}"
    finally:
        proc.terminate()
        proc.wait(20)
