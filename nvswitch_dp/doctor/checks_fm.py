"""The Fabric Manager checks: Shared NVSwitch mode, FM reachable, the module map.

Pure functions ``NodeFacts -> CheckResult``; FM was asked (or found unaskable) before,
at the edge (``fm.py``), and its answer is ``NodeFacts.fm``. FM's facts, corrected from
the original design: ``fmpm`` is a one-shot command reaching FM on TCP 127.0.0.1:6666 (no
port 8080), and Shared NVSwitch mode is ``FABRIC_MODE=1``.
"""

from __future__ import annotations

from nvswitch_dp.doctor.advice import command_note
from nvswitch_dp.doctor.facts import CheckResult, FmAnswer, NodeFacts, Status
from nvswitch_dp.vfio.inventory import resolve_module_map

# The node directory the DaemonSet mounts read-only at /opt/fm-client for FM's client
# files (deployments/containers/daemonset.yaml).
FM_CLIENT_NODE_DIR = "/opt/nvswitch-dp/fm-client"


def check_fm_mode(facts: NodeFacts) -> CheckResult:
    """``fabricmanager.cfg`` sets ``FABRIC_MODE=1`` (Shared NVSwitch multitenancy)."""
    fix_mode = (
        f"set FABRIC_MODE=1 in {facts.fm_config_path}, then "
        "`sudo systemctl restart nvidia-fabricmanager` (with no VM running)"
        + command_note(facts, "systemctl")
    )
    if facts.fm_config is None:
        return CheckResult(
            "fm-shared-nvswitch-mode",
            Status.WARN,
            f"cannot read {facts.fm_config_path}; FM mode unknown",
            "pass --fm-config with the path of fabricmanager.cfg (inside the driver "
            "container when Fabric Manager runs there)",
        )
    mode = facts.fm_config.get("FABRIC_MODE")
    if mode == "1":
        where = facts.fm_config.get("FM_CMD_UNIX_SOCKET_PATH") or (
            f"{facts.fm_config.get('FM_CMD_BIND_INTERFACE', '127.0.0.1')}:"
            f"{facts.fm_config.get('FM_CMD_PORT_NUMBER', '6666')}"
        )
        return CheckResult(
            "fm-shared-nvswitch-mode",
            Status.PASS,
            f"FABRIC_MODE=1 (Shared NVSwitch) in {facts.fm_config_path}; FM listens on {where}",
        )
    meaning = {"0": "bare metal / full passthrough", "2": "vGPU"}.get(mode or "", "unknown")
    shown = "FABRIC_MODE not set (default 0)" if mode is None else f"FABRIC_MODE={mode}"
    return CheckResult(
        "fm-shared-nvswitch-mode",
        Status.FAIL,
        f"{shown} ({meaning}) in {facts.fm_config_path}; partitions need FABRIC_MODE=1",
        fix_mode,
    )


def fm_client_fix(answer: FmAnswer) -> str:
    """How to provide the configured backend's missing client (``fmpm`` or libnvfm)."""
    mounted = (
        f"the DaemonSet mounts the node directory {FM_CLIENT_NODE_DIR} at /opt/fm-client, "
        "so put it there on the node"
    )
    if answer.backend == "libnvfm":
        return (
            "install libnvfm.so.1 (from the Fabric Manager packages of the node's driver "
            "branch) where the dynamic loader finds it, or set fabric_manager.libnvfm_path "
            f"in the configuration (--config) to its path; {mounted}"
        )
    return (
        "build fmpm from NVIDIA/Fabric-Manager-Client (NVIDIA's driver packages and driver "
        "container do not ship it) and install it at that path, or set "
        "fabric_manager.fmpm_path in the configuration (--config) to where it is; "
        f"{mounted}; or use fabric_manager.backend: libnvfm, which needs no fmpm"
    )


def fm_unreachable_fix(facts: NodeFacts) -> str:
    """What to look at when FM's client ran but FM did not answer."""
    probe = ""
    if facts.fm.backend == "fmpm" and facts.fm.client:
        probe = f"that `{facts.fm.client} -l` answers on the node, "
    return (
        "`systemctl status nvidia-fabricmanager` and `journalctl -u nvidia-fabricmanager`"
        f"{command_note(facts, 'systemctl', 'journalctl')}; check {probe}that "
        "fabric_manager.endpoint matches FM_CMD_BIND_INTERFACE/FM_CMD_PORT_NUMBER (TCP "
        "127.0.0.1:6666 by default) or FM_CMD_UNIX_SOCKET_PATH, and that the pod uses "
        "hostNetwork for TCP"
    )


def check_fm_reachable(facts: NodeFacts) -> CheckResult:
    """Fabric Manager answers "list partitions" and reports at least one partition.

    A missing client program or library is its own failure, with its own fix: FM was
    never asked, so FM's service is not what to look at.
    """
    answer = facts.fm
    if answer.client_missing is not None:
        return CheckResult(
            "fm-reachable",
            Status.FAIL,
            f"Fabric Manager not asked: {answer.client_missing}",
            fm_client_fix(answer),
        )
    if not answer.asked:
        return CheckResult("fm-reachable", Status.SKIP, "not checked: Fabric Manager not asked")
    if answer.report is None:
        detail = f"Fabric Manager did not answer: {answer.error}"
        fix = fm_unreachable_fix(facts)
        if answer.error_code == -8:  # NOT_CONFIGURED
            by_hand = ""
            if answer.backend == "fmpm" and answer.client:
                by_hand = f", or within 60 s `{answer.client} --set-activated-list <ids>`"
            fix = (
                "FM is initialising, or was restarted with --restart and waits for the "
                f"active partition list: start the plugin (it sends it){by_hand}"
            )
        return CheckResult("fm-reachable", Status.FAIL, detail, fix)
    report = answer.report
    if not report.partitions:
        return CheckResult(
            "fm-reachable",
            Status.FAIL,
            "Fabric Manager answered with no partitions",
            "Fabric Manager lists partitions only in Shared NVSwitch mode: set FABRIC_MODE=1 "
            "and restart it",
        )
    sizes = sorted({len(p.gpus) for p in report.partitions})
    active = sorted(report.active_ids)
    return CheckResult(
        "fm-reachable",
        Status.PASS,
        f"{len(report.partitions)} partitions, sizes {', '.join(f'{s}x' for s in sizes)}; "
        f"active: {', '.join(map(str, active)) or 'none'}",
    )


def module_map_fix(facts: NodeFacts) -> str:
    """How to record or write the module map."""
    return (
        "with the GPUs still on the nvidia driver, run `nvswitch-dp prepare-node` (it "
        "records every GPU's module ID in <state-dir>/node-inventory.json, which the daemon "
        "reads when module_map is not set; `nvswitch-dp prepare-node --print-module-map` "
        "prints a module_map: block instead); by hand: "
        "`nvidia-smi -q | grep -iE '^GPU |module id'`"
        f"{command_note(facts, 'nvidia-smi')} (driver 580 prints 'Module Id', older ones "
        "'Module ID') and set module_map to `<module ID>: \"0000:<bus>:00.0\"` (nvidia-smi's "
        "8-digit domain 00000000 becomes 0000)"
    )


def effective_module_map(facts: NodeFacts) -> tuple[dict[int, str], str]:
    """The module map the daemon would use and where it comes from: the configuration's
    ``module_map``, else the node inventory, else nothing."""
    if facts.module_map:
        return dict(facts.module_map), "module_map"
    if facts.inventory is not None and facts.inventory.gpus:
        return facts.inventory.module_map(), "node inventory"
    return {}, "nothing"


def fm_modules(answer: FmAnswer) -> set[int] | None:
    """The module IDs FM reports; ``None`` when FM gave none to compare with (no answer,
    or an answer without partitions, which ``fm-reachable`` fails)."""
    if answer.report is None or not answer.report.partitions:
        return None
    return {g.physical_id for p in answer.report.partitions for g in p.gpus}


def module_map_problems(facts: NodeFacts) -> list[str]:
    """What is wrong with the effective module map against FM's report (when there is
    one) and the discovered GPUs; empty when nothing is."""
    gpu_addresses = {g.address for g in facts.gpus}
    module_map, source = effective_module_map(facts)
    problems: list[str] = []
    if facts.inventory_problem is not None and not facts.module_map:
        problems.append(facts.inventory_problem)
    elif not module_map:
        problems.append("no module_map in the configuration and no node inventory")
    present = {g.address: g.gpu.key for g in facts.gpus}
    problems += resolve_module_map(facts.module_map, facts.inventory, present).problems
    reported = fm_modules(facts.fm)
    if reported is not None and module_map:
        missing = sorted(reported - set(module_map))
        if missing:
            problems.append(
                f"modules {', '.join(map(str, missing))} have no address in the {source}"
            )
    not_gpus = sorted(
        f"{m} -> {a}" for m, a in module_map.items() if a.lower() not in gpu_addresses
    )
    if not_gpus:
        problems.append(f"not a discovered GPU: {', '.join(not_gpus)}")
    by_address: dict[str, list[int]] = {}
    for module, address in module_map.items():
        by_address.setdefault(address.lower(), []).append(module)
    shared = [
        f"{a} ({', '.join(map(str, sorted(ms)))})" for a, ms in by_address.items() if len(ms) > 1
    ]
    if shared:
        problems.append(f"address used by several modules: {', '.join(shared)}")
    return problems


def check_module_map(facts: NodeFacts) -> CheckResult:
    """Every module FM reports maps to a PCI address that is a discovered GPU, one to one,
    through ``module_map`` or the node inventory, and the two do not contradict each
    other or the node.

    Without FM's answer only the node side is judged: a problem there fails with its
    fix; otherwise the comparison with FM is skipped (``fm-reachable`` says why).
    """
    problems = module_map_problems(facts)
    if problems:
        return CheckResult("module-map", Status.FAIL, "; ".join(problems), module_map_fix(facts))
    module_map, source = effective_module_map(facts)
    reported = fm_modules(facts.fm)
    if reported is None:
        why = "fm-reachable failed" if facts.fm.asked or facts.fm.client_missing else "not asked"
        return CheckResult(
            "module-map",
            Status.SKIP,
            f"{len(module_map)} entries ({source}), all discovered GPUs; the comparison "
            f"with FM's modules skipped: {why}",
        )
    extra = sorted(set(module_map) - reported)
    if extra:
        return CheckResult(
            "module-map",
            Status.WARN,
            f"modules {', '.join(map(str, extra))} are mapped ({source}) but FM reports no "
            "such module",
            "remove them from module_map, or check that FM sees every GPU (Fabric "
            "Manager's log names NVLink or GPU failures at its start)",
        )
    return CheckResult(
        "module-map",
        Status.PASS,
        f"all {len(reported)} modules FM reports map to discovered GPUs ({source})",
    )
