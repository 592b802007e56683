"""deployments/dra: the DRA-mode kustomization and its examples, checked offline.

Rendered with ``kubectl kustomize`` and validated with ``kubernetes-validate --strict``
against the schemas of Kubernetes 1.36 and 1.37 (the first with partitionable devices
on by default, and the newest). KubeVirt's VirtualMachine is a CRD without a bundled
schema: its shape is checked against the fields of KubeVirt 1.9's API types
(``GPU{name, deviceName, claimName, requestName, ...}``,
``VirtualMachineInstanceResourceClaim{name, resourceClaimName |
resourceClaimTemplateName}``) by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from test_deployments import Doc, render

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deployments" / "containers"
DRA = ROOT / "deployments" / "dra"
EXAMPLES = DRA / "examples"
NAMESPACE = "nvidia-gpu-operator"
NAME = "shared-nvswitch-device-plugin"
K8S_VERSIONS = ("1.36.0", "1.37.0")

# The contract's names (DRA.md): driver, attribute names, classes.
DRIVER = "gpu.nvswitch-dp.io"
PARTITION_ATTRIBUTES = {"kind", "size", "partitionID", "modules", "numaNodes", "platform"}
GPU_ATTRIBUTES = {"kind", "moduleID", "platform", "numaNode"} | {
    f"partition{n}x" for n in (1, 2, 4, 8, 16)
}
SIZES = (1, 2, 4, 8, 16)
CLASSES = {f"partition-{n}x.{DRIVER}" for n in SIZES} | {f"gpu.{DRIVER}"}


def validate(docs: list[Doc], crd_kinds: frozenset[str] = frozenset()) -> None:
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert doc["kind"] in crd_kinds, f"no schema for {doc['kind']}"


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str) -> Doc:
    (found,) = by_kind(docs, kind)
    return found


def load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return render(BASE)


@pytest.fixture(scope="module")
def dra() -> list[Doc]:
    return render(DRA)


@pytest.fixture(scope="module")
def pod(dra: list[Doc]) -> Doc:
    spec: Doc = one(dra, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def test_the_validator_has_both_schema_versions() -> None:
    assert set(K8S_VERSIONS) <= set(all_versions())


def test_renders_strictly_valid_objects(base: list[Doc], dra: list[Doc]) -> None:
    validate(dra)
    added = sorted(d["kind"] for d in dra)
    expected = sorted(
        [d["kind"] for d in base]
        + ["ClusterRole", "ClusterRoleBinding"]
        + ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
        + ["DeviceClass"] * len(CLASSES)
    )
    assert added == expected
    for doc in dra:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nvswitch-dp"


def test_a_broken_object_fails_the_validation(dra: list[Doc]) -> None:
    # The check can fail: an unknown field in a DeviceClass is refused for both versions.
    device_class = {**by_kind(dra, "DeviceClass")[0]}
    device_class["spec"] = {**device_class["spec"], "selector": []}
    for version in K8S_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(device_class, version, strict=True)


# ------------------------------------------------------------------ RBAC


def test_rbac_is_exactly_the_least_privilege(dra: list[Doc], pod: Doc) -> None:
    assert not by_kind(dra, "Role") and not by_kind(dra, "RoleBinding")
    role = one(dra, "ClusterRole")
    rules = {
        (group, resource, frozenset(rule["verbs"]))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("resource.k8s.io", "resourceclaims", frozenset({"get"})),
        ("resource.k8s.io", "resourceclaims/status", frozenset({"update"})),
        (
            "resource.k8s.io",
            "resourceslices",
            frozenset({"create", "update", "delete", "get", "list", "watch"}),
        ),
    }
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"])
    binding = one(dra, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    sa = one(dra, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    # The token reaches this pod only: the ServiceAccount keeps automount off.
    assert pod["automountServiceAccountToken"] is True
    assert sa["automountServiceAccountToken"] is False


def test_slice_writes_are_limited_to_the_pods_own_node(dra: list[Doc]) -> None:
    policy = one(dra, "ValidatingAdmissionPolicy")
    binding = one(dra, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["resourceslices"]
    assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    (condition,) = spec["matchConditions"]
    assert f'"system:serviceaccount:{NAMESPACE}:{NAME}"' in condition["expression"]
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    assert "authentication.kubernetes.io/node-name" in variables["userNodeName"]
    assert "spec.?nodeName" in variables["objectNodeName"]
    checks = [v["expression"] for v in spec["validations"]]
    assert "variables.userNodeName == variables.objectNodeName" in checks


# ------------------------------------------------------------------ DaemonSet


def test_runs_the_dra_mode_with_the_node_name(pod: Doc) -> None:
    (container,) = pod["containers"]
    assert container["args"][:3] == ["run", "--mode", "dra"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["HGX_H200_CONFIG_PATH"]["value"] == "/etc/nvswitch-dp/config.yaml"


def test_host_mounts_for_dra(pod: Doc) -> None:
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # Same path inside as on the host: the CDI specs and the kubelet use host paths.
    for path in (
        "/var/lib/kubelet/plugins_registry",
        f"/var/lib/kubelet/plugins/{DRIVER}",
        "/var/run/cdi",
    ):
        mount = mounts[path]
        assert volumes[mount["name"]]["hostPath"]["path"] == path
        assert not mount.get("readOnly"), path
    # Device-plugin mode's kubelet sockets are gone, and nothing else of the kubelet's.
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert "/var/lib/kubelet/device-plugins" not in host_paths
    assert "/var/lib/kubelet/pod-resources" not in host_paths
    assert {p for p in host_paths if p.startswith("/var/lib/kubelet")} == {
        "/var/lib/kubelet/plugins_registry",
        f"/var/lib/kubelet/plugins/{DRIVER}",
    }
    assert set(mounts) == {m["mountPath"] for m in container["volumeMounts"]}
    assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)


def test_security_posture_is_the_bases(base: list[Doc], pod: Doc) -> None:
    base_pod = one(base, "DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (base_container,) = base_pod["containers"]
    assert container["securityContext"] == base_container["securityContext"]
    sc = container["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"] == base_pod["securityContext"]
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    # Everything the patch does not name is the base's.
    changed = {"volumes", "containers", "automountServiceAccountToken"}
    assert {k: v for k, v in pod.items() if k not in changed} == {
        k: v for k, v in base_pod.items() if k not in changed
    }
    kept = {"args", "env", "volumeMounts"}
    assert {k: v for k, v in container.items() if k not in kept} == {
        k: v for k, v in base_container.items() if k not in kept
    }
    # What stays read-only stays read-only (PodResources is dropped, not made writable).
    dropped = {"/var/lib/kubelet/pod-resources"}
    read_only = {
        m["mountPath"]
        for m in base_container["volumeMounts"]
        if m.get("readOnly") and m["mountPath"] not in dropped
    }
    assert read_only == {m["mountPath"] for m in container["volumeMounts"] if m.get("readOnly")}


# ------------------------------------------------------------------ DeviceClasses

_CLAUSE_DRIVER = re.compile(r'device\.driver == "(?P<driver>[^"]+)"')
_CLAUSE_ATTRIBUTE = re.compile(
    r'device\.attributes\["(?P<domain>[^"]+)"\]\.(?P<name>[A-Za-z][A-Za-z0-9]*)'
    r' == (?P<value>"[^"]*"|\d+)'
)


def parse_selector(expression: str) -> tuple[str, dict[str, str | int]]:
    """The driver and the attribute equalities of a conjunction of simple CEL clauses;
    anything else in the expression fails the parse."""
    driver = ""
    attributes: dict[str, str | int] = {}
    for clause in (c.strip() for c in expression.split("&&")):
        if m := _CLAUSE_DRIVER.fullmatch(clause):
            driver = m["driver"]
        elif m := _CLAUSE_ATTRIBUTE.fullmatch(clause):
            assert m["domain"] == driver, f"attribute of another domain in {clause!r}"
            value = m["value"]
            attributes[m["name"]] = value.strip('"') if value.startswith('"') else int(value)
        else:
            raise AssertionError(f"unexpected CEL clause {clause!r}")
    return driver, attributes


def test_parse_selector_refuses_what_it_does_not_know() -> None:
    with pytest.raises(AssertionError, match="unexpected CEL clause"):
        parse_selector('device.driver == "x" || device.attributes["x"].size == 4')
    with pytest.raises(AssertionError, match="another domain"):
        parse_selector('device.driver == "x" && device.attributes["y"].size == 4')


def test_device_classes_select_the_contract_attributes(dra: list[Doc]) -> None:
    classes = {d["metadata"]["name"]: d for d in by_kind(dra, "DeviceClass")}
    assert set(classes) == CLASSES
    for name, device_class in classes.items():
        assert "namespace" not in device_class["metadata"]  # cluster-scoped
        (selector,) = device_class["spec"]["selectors"]
        driver, attributes = parse_selector(selector["cel"]["expression"])
        assert driver == DRIVER, name
        if name == f"gpu.{DRIVER}":
            assert attributes == {"kind": "gpu"}
            assert set(attributes) <= GPU_ATTRIBUTES
        else:
            size = int(name.removeprefix("partition-").split("x.")[0])
            assert attributes == {"kind": "partition", "size": size}
            assert set(attributes) <= PARTITION_ATTRIBUTES


# ------------------------------------------------------------------ examples


def test_pod_example_claims_one_4x_partition() -> None:
    docs = load(EXAMPLES / "pod-4x-partition.yaml")
    validate(docs)
    template = one(docs, "ResourceClaimTemplate")
    pod = one(docs, "Pod")
    (request,) = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"] == {"deviceClassName": f"partition-4x.{DRIVER}", "count": 1}
    (claim,) = pod["spec"]["resourceClaims"]
    assert claim == {
        "name": claim["name"],
        "resourceClaimTemplateName": template["metadata"]["name"],
    }
    assert pod["metadata"]["namespace"] == template["metadata"]["namespace"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["claims"] == [{"name": claim["name"]}]
    assert "NVSWITCH_DP_PARTITION_IDS" in container["args"][0]


# KubeVirt 1.9, staging/src/kubevirt.io/api/core/v1: the fields of GPU (with the inlined
# ClaimRequest) and of VirtualMachineInstanceResourceClaim.
_KUBEVIRT_GPU_FIELDS = {
    "name",
    "deviceName",
    "claimName",
    "requestName",
    "virtualGPUOptions",
    "tag",
}
_KUBEVIRT_CLAIM_FIELDS = {"name", "resourceClaimName", "resourceClaimTemplateName"}


def test_kubevirt_example_asks_for_four_gpus_of_one_partition() -> None:
    docs = load(EXAMPLES / "kubevirt-vm-4x.yaml")
    validate(docs, crd_kinds=frozenset({"VirtualMachine"}))
    template = one(docs, "ResourceClaimTemplate")
    devices = template["spec"]["spec"]["devices"]
    requests = devices["requests"]
    names = [r["name"] for r in requests]
    assert names == ["gpu0", "gpu1", "gpu2", "gpu3"]
    for request in requests:
        # KubeVirt takes exactly one device per request.
        assert set(request) == {"name", "exactly"}
        assert request["exactly"] == {"deviceClassName": f"gpu.{DRIVER}", "count": 1}
    assert devices["constraints"] == [
        {"requests": names, "matchAttribute": f"{DRIVER}/partition4x"}
    ]
    assert "partition4x" in GPU_ATTRIBUTES

    vm = one(docs, "VirtualMachine")
    assert vm["apiVersion"] == "kubevirt.io/v1"
    assert vm["metadata"]["namespace"] == template["metadata"]["namespace"]
    vmi = vm["spec"]["template"]["spec"]
    (claim,) = vmi["resourceClaims"]
    assert set(claim) <= _KUBEVIRT_CLAIM_FIELDS
    assert claim["resourceClaimTemplateName"] == template["metadata"]["name"]
    assert "resourceClaimName" not in claim  # exactly one of the two
    gpus = vmi["domain"]["devices"]["gpus"]
    assert "hostDevices" not in vmi["domain"]["devices"]
    for gpu in gpus:
        assert set(gpu) <= _KUBEVIRT_GPU_FIELDS
        # KubeVirt treats a GPU as a DRA GPU when deviceName is empty and a claim is named.
        assert "deviceName" not in gpu
        assert gpu["claimName"] == claim["name"]
    assert len({g["name"] for g in gpus}) == len(gpus)
    assert sorted(g["requestName"] for g in gpus) == names  # each request exactly once
