"""The manifests, the Containerfile and the Grafana dashboard, checked offline.

Kustomizations are rendered with ``kubectl kustomize`` and validated against the
Kubernetes OpenAPI schemas with ``kubernetes-validate`` (strict: unknown fields fail).
Kinds without a bundled schema (CRDs: ServiceMonitor, VirtualMachine) are skipped by the
validator and checked by hand here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from nvswitch_dp.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deployments"
BASE = DEPLOY / "containers"
OVERLAY = DEPLOY / "overlays" / "with-servicemonitor"
NAMESPACE = "nvidia-gpu-operator"
NAME = "shared-nvswitch-device-plugin"
# Oldest and newest minor versions checked; the schema bundle ships up to its release.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_KINDS = {"ServiceMonitor", "VirtualMachine"}
METRICS = {
    "hgx_h200_devices_total",
    "hgx_h200_partition_operations_total",
    "hgx_h200_allocation_duration_seconds",
    "hgx_h200_fabric_manager_up",
    "hgx_h200_resource_registered",
    "hgx_h200_partition_state",
}


Doc = dict[str, Any]


def render(directory: Path) -> list[Doc]:
    # kubectl renders kustomize offline; a machine without it fails here, never skips.
    assert shutil.which("kubectl"), "kubectl is needed to render the kustomizations"
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def validate(docs: list[Doc]) -> None:
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert doc["kind"] in CRD_KINDS, f"no schema for {doc['kind']}"


def by_kind(docs: list[Doc], kind: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return render(BASE)


@pytest.fixture(scope="module")
def overlay() -> list[Doc]:
    return render(OVERLAY)


@pytest.fixture(scope="module")
def daemonset(base: list[Doc]) -> Doc:
    return by_kind(base, "DaemonSet")


def test_base_renders_valid_objects_and_no_servicemonitor(base: list[Doc]) -> None:
    validate(base)
    kinds = sorted(d["kind"] for d in base)
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "Service", "ServiceAccount"]
    assert "ServiceMonitor" not in kinds


def test_overlay_adds_only_the_servicemonitor(base: list[Doc], overlay: list[Doc]) -> None:
    validate(overlay)
    assert sorted(d["kind"] for d in overlay) == sorted(
        [*(d["kind"] for d in base), "ServiceMonitor"]
    )
    sm = by_kind(overlay, "ServiceMonitor")
    svc = by_kind(overlay, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["namespace"] == NAMESPACE
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]


def test_servicemonitor_copies_agree() -> None:
    """deployments/containers/servicemonitor.yaml (for kubectl apply -f) = the Component's."""
    plain = yaml.safe_load((BASE / "servicemonitor.yaml").read_text())
    component = yaml.safe_load(
        (BASE / "components" / "servicemonitor" / "servicemonitor.yaml").read_text()
    )
    assert plain == component
    kustomization = yaml.safe_load(
        (BASE / "components" / "servicemonitor" / "kustomization.yaml").read_text()
    )
    assert kustomization["kind"] == "Component"


def test_everything_is_in_the_namespace_with_the_contract_names(base: list[Doc]) -> None:
    for doc in base:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]
    assert by_kind(base, "DaemonSet")["metadata"]["name"] == NAME
    assert by_kind(base, "ConfigMap")["metadata"]["name"] == f"{NAME}-config"
    assert by_kind(base, "Service")["metadata"]["name"] == f"{NAME}-metrics"
    pod_labels = by_kind(base, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["name"] == NAME
    assert by_kind(base, "Service")["spec"]["selector"] == {"name": NAME}


def test_service_exposes_port_9090_named_metrics(base: list[Doc]) -> None:
    (port,) = by_kind(base, "Service")["spec"]["ports"]
    assert (port["name"], port["port"]) == ("metrics", 9090)


def test_no_kubernetes_api_access(base: list[Doc]) -> None:
    sa = by_kind(base, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert not [d for d in base if d["kind"] in {"Role", "ClusterRole", "RoleBinding"}]
    pod = by_kind(base, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False


def test_security_context_is_tight(daemonset: Doc) -> None:
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["priorityClassName"] == "system-node-critical"
    # hostNetwork only to reach FM on the host's 127.0.0.1:6666, with cluster DNS kept.
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert not pod.get("hostPID") and not pod.get("hostIPC")


def test_probes_and_resources(daemonset: Doc) -> None:
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert (live["path"], live["port"]) == ("/healthz", 9090)
    assert (ready["path"], ready["port"]) == ("/readyz", 9090)
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    limits = container["resources"]["limits"]
    requests = container["resources"]["requests"]
    assert limits["memory"].endswith("Mi") and int(limits["memory"][:-2]) >= 80
    assert "cpu" in requests and "memory" in requests


def test_host_mounts(daemonset: Doc) -> None:
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    expected_host_paths = {
        "/var/lib/kubelet/device-plugins": False,
        "/var/lib/kubelet/pod-resources": True,
        "/dev/vfio": True,
        "/sys": True,
        "/run/nvidia-fabricmanager": False,
        "/var/lib/nvswitch-dp": False,
    }
    for path, read_only in expected_host_paths.items():
        mount = mounts[path]
        assert volumes[mount["name"]]["hostPath"]["path"] == path
        assert bool(mount.get("readOnly")) is read_only, path
    # Config from the ConfigMap, token from the optional Secret, both as files.
    config = mounts["/etc/nvswitch-dp/config.yaml"]
    assert volumes[config["name"]]["configMap"]["name"] == f"{NAME}-config"
    token = volumes[mounts["/etc/nvswitch-dp/api-token"]["name"]]["secret"]
    assert token == {
        "secretName": f"{NAME}-api-token",
        "optional": True,
        "defaultMode": 0o400,
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HGX_H200_CONFIG_PATH"] == "/etc/nvswitch-dp/config.yaml"


def test_prepare_node_init_container_reads_the_modules_then_binds(daemonset: Doc) -> None:
    pod = daemonset["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (container,) = pod["containers"]
    assert init["image"] == container["image"]
    assert init["args"][:3] == [
        "prepare-node",
        "--config=/etc/nvswitch-dp/config.yaml",
        "--bind-vfio",
    ]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    # What it writes: sysfs (binding) and the state directory (the inventory the daemon
    # reads, at the same path in both containers); everything else read-only.
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/sys", "/var/lib/nvswitch-dp", "/tmp"}
    assert volumes[mounts["/host/proc"]["name"]]["hostPath"]["path"] == "/proc"
    assert "--proc-root=/host/proc" in init["args"]
    assert "--driver-root=/host/driver-root" in init["args"]
    # one refused GPU must not keep the daemon (and every other GPU) from starting
    assert "--allow-refused" in init["args"]
    # the driver's directories only, never the host's root with its credentials
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert "/" not in host_paths and "/etc" not in host_paths
    assert volumes[mounts["/host/driver-root/usr/lib"]["name"]]["hostPath"]["path"] == "/usr/lib"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/var/lib/nvswitch-dp"}
    sc = init["securityContext"]
    assert sc["privileged"] is True and sc["readOnlyRootFilesystem"] is True
    # The privilege is the init container's alone, and the pod stays in its own PID
    # namespace: the host's /proc is read through a mount, not hostPID.
    assert not pod.get("hostPID")
    assert container["securityContext"]["privileged"] is False
    assert init["resources"]["limits"]["memory"].endswith("Mi")


def test_scheduling(daemonset: Doc) -> None:
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvswitch-dp.io/hgx": "true"}
    keys = {t["key"]: t for t in pod["tolerations"]}
    assert keys["nvidia.com/gpu"]["operator"] == "Exists"
    assert "effect" not in keys["nvidia.com/gpu"]


def test_configmap_holds_a_valid_config(base: list[Doc], daemonset: Doc) -> None:
    text = by_kind(base, "ConfigMap")["data"]["config.yaml"]
    config = parse_config(text)
    assert config.plugin.resource_prefix == "auto"
    assert dict(config.vfio.gpu_device_ids) == {"10de:2335": "H200 SXM 141GB"}
    # No hand-written map: the init container records it in the node inventory.
    assert config.module_map == {}
    assert config.api.listen.endswith(":9090")
    token_file = config.api.token_file
    assert token_file is not None and str(token_file) == "/etc/nvswitch-dp/api-token/token"
    assert str(config.state_dir) == "/var/lib/nvswitch-dp"
    assert "8080" not in text
    # Every path the config names inside the container is mounted.
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    mounted = [m["mountPath"] for m in container["volumeMounts"]]
    for path in (
        str(config.plugin.directory),
        str(Path(config.plugin.pod_resources_socket).parent),
        str(config.state_dir),
        str(Path(config.fabric_manager.fmpm_path).parent),
        str(Path(token_file).parent),
    ):
        assert str(path) in mounted, path


def test_examples_are_valid() -> None:
    pod = yaml.safe_load((DEPLOY / "examples" / "qemu-launcher-pod.yaml").read_text())
    validate([pod])
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu-h200-4x"] == 1
    assert "PCI_RESOURCE_NVIDIA_COM_GPU-H200-4X" in " ".join(container["args"])
    vm = yaml.safe_load((DEPLOY / "examples" / "kubevirt-vm.yaml").read_text())
    validate([vm])
    assert vm["apiVersion"] == "kubevirt.io/v1"
    host_devices = vm["spec"]["template"]["spec"]["domain"]["devices"]["hostDevices"]
    assert {d["deviceName"] for d in host_devices} == {"nvidia.com/gpu-h200-4x"}
    assert len({d["name"] for d in host_devices}) == len(host_devices) == 4


# ------------------------------------------------------------------ Containerfile


def containerfile() -> str:
    return (ROOT / "Containerfile").read_text()


def test_containerfile_is_multi_stage_on_pinned_slim_bases() -> None:
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", containerfile(), re.MULTILINE)
    assert [stage for _, stage in froms] == ["builder", "runtime"]
    for image, _ in froms:
        assert re.fullmatch(
            r"(docker\.io/library/)?python:3\.11(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{64})?",
            image,
        ), image
    assert "COPY --from=builder /opt/venv /opt/venv" in containerfile()


def test_containerfile_user_entrypoint_and_installs() -> None:
    text = containerfile()
    assert re.search(r"^USER\s+\S+", text, re.MULTILINE)
    assert 'ENTRYPOINT ["nvswitch-dp"]' in text
    assert 'CMD ["run"]' in text
    assert "COPY pyproject.toml" in text
    assert "apt-get" not in text
    # Every pip install installs the project (its pinned dependencies), never a bare name.
    for line in re.findall(r"pip (?:install|wheel)[^\n&\\]*", text):
        assert line.rstrip().endswith((" .", "nvswitch-dp", "'.[nvml]'", "'nvswitch-dp[nvml]'")), (
            line
        )


def test_ignore_files_agree() -> None:
    assert (ROOT / ".containerignore").read_text() == (ROOT / ".dockerignore").read_text()
    ignored = (ROOT / ".containerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ------------------------------------------------------------------ Grafana dashboard

DASHBOARD = DEPLOY / "grafana" / "nvswitch-dp-dashboard.json"
_SUFFIXES = ("_bucket", "_sum", "_count")
_FUNCTIONS = {
    "sum", "rate", "irate", "increase", "by", "without", "histogram_quantile", "max",
    "min", "avg", "count", "le", "on", "ignoring", "group_left", "clamp_min", "topk",
    "label_replace", "sort_desc", "bool", "or", "and", "unless", "time", "vector",
}  # fmt: skip


def _strings(node: Any, key: str) -> list[str]:
    """Every string value under ``key``, anywhere in the JSON tree."""
    if isinstance(node, dict):
        found = [node[key]] if isinstance(node.get(key), str) else []
        return found + [e for v in node.values() for e in _strings(v, key)]
    if isinstance(node, list):
        return [e for v in node for e in _strings(v, key)]
    return []


def _metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that are not functions, keywords or labels."""
    text = re.sub(r'"[^"]*"', '""', expr)  # label values
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # range selectors ($__rate_interval)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text)) - _FUNCTIONS
    return {_base_metric(n) for n in names}


def _base_metric(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in METRICS:
            return name.removesuffix(suffix)
    return name


def test_dashboard_uses_only_the_plugins_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _strings(dashboard["panels"], "expr")
    assert len(exprs) >= 6
    used: set[str] = set()
    for expr in exprs:
        names = _metric_names(expr)
        assert names <= METRICS, f"{sorted(names - METRICS)} in {expr!r}"
        used |= names
    assert used == METRICS
    for query in _strings(dashboard["templating"], "query"):
        if query.startswith("label_values("):
            metric = query.removeprefix("label_values(").split(",")[0].strip()
            assert metric in METRICS, query
    assert dashboard["title"] and dashboard["uid"] == "nvswitch-dp"
