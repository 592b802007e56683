"""deployments/overlays/group-*: the node-group overlays, rendered and checked offline.

Each group runs one mode (or one configuration) on the nodes carrying its value of the
label ``nvswitch-dp.io/group``. Rendered with ``kubectl kustomize`` and validated with
``kubernetes-validate --strict`` like the other kustomizations; then the properties that
make the groups safe to run side by side: no node selected by two DaemonSets, the
objects the groups share rendered identically, each group's own objects named apart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_deployments import K8S_VERSIONS as BASE_VERSIONS
from test_deployments import Doc, render
from test_deployments_dra import CLASSES
from test_deployments_dra import K8S_VERSIONS as DRA_VERSIONS

from nvswitch_dp.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ROOT / "deployments" / "overlays"
BASE = ROOT / "deployments" / "containers"
GROUP_LABEL = "nvswitch-dp.io/group"
NAME = "shared-nvswitch-device-plugin"
# group -> (the DaemonSet's name, DRA mode)
GROUPS = {
    "device-plugin": (NAME, False),
    "kubevirt": (f"{NAME}-kubevirt", False),
    "dra": (f"{NAME}-dra", True),
}


def validate(docs: list[Doc], versions: tuple[str, ...]) -> None:
    import kubernetes_validate

    for doc in docs:
        for version in versions:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {group: render(OVERLAYS / f"group-{group}") for group in GROUPS}


def daemonset(docs: list[Doc]) -> Doc:
    (found,) = [d for d in docs if d["kind"] == "DaemonSet"]
    return found


def key(doc: Doc) -> tuple[str, str, str]:
    meta = doc["metadata"]
    return doc["kind"], meta.get("namespace", ""), meta["name"]


def test_every_group_overlay_is_listed_here() -> None:
    on_disk = {p.name.removeprefix("group-") for p in OVERLAYS.glob("group-*")}
    assert on_disk == set(GROUPS)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_group_renders_valid_objects(rendered: dict[str, list[Doc]], group: str) -> None:
    dra = GROUPS[group][1]
    validate(rendered[group], DRA_VERSIONS if dra else BASE_VERSIONS)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_group_runs_its_mode_on_its_nodes_only(
    rendered: dict[str, list[Doc]], group: str
) -> None:
    name, dra = GROUPS[group]
    ds = daemonset(rendered[group])
    pod = ds["spec"]["template"]
    assert ds["metadata"]["name"] == name
    assert pod["spec"]["nodeSelector"] == {"nvswitch-dp.io/hgx": "true", GROUP_LABEL: group}
    assert pod["metadata"]["labels"][GROUP_LABEL] == group
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    args = pod["spec"]["containers"][0]["args"]
    assert ("--mode" in args and args[args.index("--mode") + 1] == "dra") is dra
    if name == NAME:
        # The base's DaemonSet, updated in place: its selector is immutable.
        assert selector == daemonset(render(BASE))["spec"]["selector"]["matchLabels"]
    else:
        assert selector[GROUP_LABEL] == group  # never counts another group's pods


def test_no_node_is_selected_by_two_daemonsets(rendered: dict[str, list[Doc]]) -> None:
    """nodeSelector terms are ANDed and a label has one value: distinct values of the
    group label make the DaemonSets' node sets disjoint."""
    selectors = [
        daemonset(docs)["spec"]["template"]["spec"]["nodeSelector"] for docs in rendered.values()
    ]
    values = [s[GROUP_LABEL] for s in selectors]
    assert len(set(values)) == len(values)
    assert len({daemonset(docs)["metadata"]["name"] for docs in rendered.values()}) == len(GROUPS)


def test_shared_objects_render_identically_and_own_objects_are_apart(
    rendered: dict[str, list[Doc]],
) -> None:
    """Applying several groups must not make them fight over an object: what two groups
    both render is the same object, and each group's DaemonSet and ConfigMap are its own."""
    seen: dict[tuple[str, str, str], tuple[str, Doc]] = {}
    for group, docs in rendered.items():
        for doc in docs:
            if key(doc) in seen:
                other, first = seen[key(doc)]
                assert doc == first, f"{key(doc)} differs between {other} and {group}"
            else:
                seen[key(doc)] = (group, doc)
    for group, docs in rendered.items():
        own = {key(d) for d in docs if d["kind"] in {"DaemonSet", "ConfigMap"}}
        for other, other_docs in rendered.items():
            if other != group:
                assert not own & {key(d) for d in other_docs}, (group, other)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_daemonset_refers_to_objects_its_group_renders(
    rendered: dict[str, list[Doc]], group: str
) -> None:
    docs = rendered[group]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    pod = daemonset(docs)["spec"]["template"]["spec"]
    assert ("ServiceAccount", pod["serviceAccountName"]) in names
    config_maps = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert config_maps and {("ConfigMap", n) for n in config_maps} <= names


def test_the_dra_group_brings_the_contract_classes_and_a_policy_for_its_account(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["dra"]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "DeviceClass"} == CLASSES
    account = daemonset(docs)["spec"]["template"]["spec"]["serviceAccountName"]
    (policy,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    (condition,) = policy["spec"]["matchConditions"]
    assert f'"system:serviceaccount:nvidia-gpu-operator:{account}"' in condition["expression"]
    (binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": "nvidia-gpu-operator"}
    ]


def _config_text(docs: list[Doc]) -> str:
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    text: str = config_map["data"]["config.yaml"]
    return text


def test_group_configs_differ_from_the_base_only_where_stated(
    rendered: dict[str, list[Doc]],
) -> None:
    base = _config_text(render(BASE))
    assert _config_text(rendered["device-plugin"]) == base
    assert _config_text(rendered["dra"]) == base
    kubevirt = _config_text(rendered["kubevirt"])
    # The whole file is a copy (a ConfigMap key is one string): nothing but this line.
    line = "\n  allocation_unit: {}\n"  # the key itself, indented under plugin:, not a comment
    assert kubevirt.count(line.format("gpu")) == 1
    assert kubevirt.replace(line.format("gpu"), line.format("partition")) == base
    assert parse_config(kubevirt).plugin.allocation_unit == "gpu"
    assert parse_config(base).plugin.allocation_unit == "partition"


def test_the_migration_guide_names_each_group_label() -> None:
    guide = (ROOT / "docs" / "dra.md").read_text()
    for group in GROUPS:
        assert f"{GROUP_LABEL}={group}" in guide
        assert f"deployments/overlays/group-{group}" in guide or f"`group-{group}`" in guide
