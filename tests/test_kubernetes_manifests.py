"""Tests for deploy/kubernetes/: schema validation offline, the Prometheus Operator objects'
structure, the references between the manifests, and the generated PrometheusRules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
# Every Kubernetes object file; kustomization.yaml is kustomize's, not an API object.
MANIFESTS = sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
# Custom resources: kubernetes-validate has no schema for them and only warns, so
# test_operator_objects_have_the_required_fields checks them by hand.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
# The newest schemas kubernetes-validate ships (its default) and an older cluster still in use.
KUBERNETES_VERSIONS = [None, "1.29.0"]


def load_all() -> dict[str, dict[str, Any]]:
    """Every object by kind; a kind that occurs twice (PrometheusRule) by kind/name too."""
    objects: dict[str, dict[str, Any]] = {}
    for path in MANIFESTS:
        for obj in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            kind, name = obj["kind"], obj["metadata"]["name"]
            objects.setdefault(kind, obj)
            objects[f"{kind}/{name}"] = obj
    return objects


OBJECTS = load_all()


def test_the_expected_objects_are_there() -> None:
    """The deployment consists of exactly these objects."""
    assert sorted(k for k in OBJECTS if "/" in k) == [
        "ConfigMap/bitrix24-exporter-config",
        "PodDisruptionBudget/bitrix24-exporter",
        "PrometheusRule/bitrix24-exporter-alerts",
        "PrometheusRule/bitrix24-exporter-rules",
        "Secret/bitrix24-exporter-webhooks",
        "Service/bitrix24-exporter",
        "ServiceMonitor/bitrix24-exporter",
        "StatefulSet/bitrix24-exporter",
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS, ids=lambda v: v or "latest")
def test_manifests_validate_strictly(version: str | None) -> None:
    """kubernetes-validate --strict (offline, bundled schemas) accepts every manifest."""
    command = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    if version is not None:
        command += ["--kubernetes-version", version]
    result = subprocess.run(
        [*command, *map(str, MANIFESTS)], capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Guard against a pass that validated nothing: only the CRDs may lack a schema.
    passed = set(re.findall(r"passed for resource (\w+)/", output))
    assert passed == {"configmap", "poddisruptionbudget", "secret", "service", "statefulset"}
    for line in output.splitlines():
        if line.startswith("WARN"):
            assert any(f"kind {kind} " in line for kind in CRD_KINDS), line


def test_manifests_are_namespace_agnostic() -> None:
    """No object names a namespace: `kubectl apply -n` or kustomize chooses it."""
    assert [k for k, obj in OBJECTS.items() if "namespace" in obj["metadata"]] == []


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    """`kubectl apply -k` must never overwrite real webhooks with the example's placeholders."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text(encoding="utf-8"))
    assert "namespace" not in kustomization
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in MANIFESTS if p.name != "secret.example.yaml"
    )


def test_operator_objects_have_the_required_fields() -> None:
    """ServiceMonitor and PrometheusRule carry what the Operator's CRDs require."""
    for key in ("ServiceMonitor", "PrometheusRule/bitrix24-exporter-rules"):
        assert OBJECTS[key]["apiVersion"] == "monitoring.coreos.com/v1"
    monitor = OBJECTS["ServiceMonitor"]
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"jobLabel", "selector", "endpoints", "namespaceSelector"}
    assert monitor["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
        assert isinstance(endpoint["port"], str)
        assert re.fullmatch(r"\d+(ms|s|m)", endpoint["interval"])
        assert re.fullmatch(r"\d+(ms|s|m)", endpoint["scrapeTimeout"])
    for key in (
        "PrometheusRule/bitrix24-exporter-rules",
        "PrometheusRule/bitrix24-exporter-alerts",
    ):
        rule = OBJECTS[key]
        assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
        assert set(rule["spec"]) == {"groups"}
        for group in rule["spec"]["groups"]:
            assert set(group) <= {"name", "interval", "rules", "labels"}
            assert isinstance(group["name"], str)
            assert group["rules"]
            for item in group["rules"]:
                assert ("alert" in item) != ("record" in item), item
                assert isinstance(item["expr"], str | int)
                allowed = {"alert", "record", "expr", "for", "labels", "annotations"}
                assert set(item) <= allowed, item


def rule_groups(name: str) -> list[Any]:
    data = yaml.safe_load((ROOT / "prometheus" / name).read_text(encoding="utf-8"))
    groups: list[Any] = data["groups"]
    return groups


def test_prometheusrules_equal_the_rule_files() -> None:
    """The PrometheusRules' groups are exactly prometheus/rules.yml's and alerts.yml's."""
    rules = OBJECTS["PrometheusRule/bitrix24-exporter-rules"]["spec"]["groups"]
    alerts = OBJECTS["PrometheusRule/bitrix24-exporter-alerts"]["spec"]["groups"]
    assert rules == rule_groups("rules.yml")
    assert alerts == rule_groups("alerts.yml")


def test_prometheusrule_yaml_is_what_the_generator_writes() -> None:
    """prometheusrule.yaml is current: build_prometheusrule.py --check passes."""
    result = subprocess.run(
        [sys.executable, str(KUBE / "build_prometheusrule.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = OBJECTS["StatefulSet"]["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def env() -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container()["env"]}


def test_statefulset_shards_by_pod_ordinal() -> None:
    """BITRIX24_SHARD_COUNT equals replicas, and the index comes from the pod's own name."""
    statefulset = OBJECTS["StatefulSet"]
    assert env()["BITRIX24_SHARD_COUNT"]["value"] == str(statefulset["spec"]["replicas"])
    assert "BITRIX24_SHARD_INDEX" not in env()
    assert env()["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert statefulset["spec"]["serviceName"] == OBJECTS["Service"]["metadata"]["name"]


def test_selectors_match_the_pods() -> None:
    """Service, StatefulSet, PodDisruptionBudget and ServiceMonitor all find what they mean."""
    pod_labels = OBJECTS["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    service = OBJECTS["Service"]
    monitor = OBJECTS["ServiceMonitor"]

    def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert matches(OBJECTS["StatefulSet"]["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(service["spec"]["selector"], pod_labels)
    assert matches(OBJECTS["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])

    port_names = {p["name"] for p in container()["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= set(service_ports)
    assert {p["targetPort"] for p in service_ports.values()} <= port_names
    assert [p["containerPort"] for p in container()["ports"]] == [9877]
    assert service["spec"]["clusterIP"] == "None"


def test_scrape_job_is_the_one_the_alerts_expect() -> None:
    """jobLabel names a Service label whose value is the job in prometheus/alerts.yml."""
    job_label = OBJECTS["ServiceMonitor"]["spec"]["jobLabel"]
    job = OBJECTS["Service"]["metadata"]["labels"][job_label]
    exprs = [str(r["expr"]) for g in rule_groups("alerts.yml") for r in g["rules"]]
    assert {j for e in exprs for j in re.findall(r'job="([^"]+)"', e)} == {job}


def test_probes_and_hardening() -> None:
    """Readiness on /readyz, liveness on /healthz, non-root with a read-only root."""
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True
    assert pod_spec()["securityContext"]["runAsUser"] != 0
    assert {"requests", "limits"} <= set(c["resources"])


def test_the_example_config_is_valid_with_the_example_secret() -> None:
    """The ConfigMap's config.yaml parses, with ${VAR}s from the Secret the pod loads."""
    secret = OBJECTS["Secret"]
    assert [s["secretRef"]["name"] for s in container()["envFrom"]] == [secret["metadata"]["name"]]
    configmap = OBJECTS["ConfigMap"]
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == configmap["metadata"]["name"]
    config_arg = next(a for a in container()["args"] if a.startswith("--config="))
    assert config_arg == f"--config={mounts[config_volume]}/config.yaml"

    text = configmap["data"]["config.yaml"]
    config = parse_config(yaml.safe_load(text), environ=secret["stringData"])
    assert len(config.portals) >= 2  # enough to show sharding
    assert set(re.findall(r"\$\{(\w+)\}", text)) == set(secret["stringData"])


def test_the_secret_example_holds_no_secret() -> None:
    """Placeholders only: every webhook's secret segment is REPLACE-ME."""
    for value in OBJECTS["Secret"]["stringData"].values():
        assert value.endswith("/REPLACE-ME/"), value
