"""Which check depends on which, running them in that order, and the printed report.

Rule: a check runs only when every check it ``needs`` was judged and did not fail;
otherwise it is SKIP and names the failed check(s) at the root of it, never its own fix.
:data:`CHECKS` lists every check after the checks it needs, so the report's first
failure is a root cause: on a node without GPUs that is ``gpus``, not a GRUB edit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nvswitch_dp.doctor.checks_fm import check_fm_mode, check_fm_reachable, check_module_map
from nvswitch_dp.doctor.checks_node import (
    check_gpus,
    check_gpus_vfio,
    check_hugepages,
    check_iommu,
    check_vfio_modules,
)
from nvswitch_dp.doctor.facts import CheckResult, FmAnswer, NodeFacts, Roots, Status, read_facts
from nvswitch_dp.doctor.fm import ListPartitions, ask_fabric_manager


@dataclass(frozen=True, slots=True)
class Check:
    """One check: its name (as its result carries it), its judge, and the checks whose
    failure makes judging it pointless (their fix comes first)."""

    name: str
    judge: Callable[[NodeFacts], CheckResult]
    needs: tuple[str, ...] = ()


CHECKS: tuple[Check, ...] = (
    Check("gpus", check_gpus),
    Check("iommu", check_iommu, ("gpus",)),
    Check("vfio-modules", check_vfio_modules, ("gpus",)),
    # Binding cannot help before the IOMMU is on and vfio-pci is loaded.
    Check("gpus-vfio", check_gpus_vfio, ("gpus", "iommu", "vfio-modules")),
    Check("hugepages", check_hugepages, ("gpus",)),
    Check("fm-shared-nvswitch-mode", check_fm_mode, ("gpus",)),
    # FM lists no partitions outside Shared NVSwitch mode: that check's fix comes first.
    Check("fm-reachable", check_fm_reachable, ("gpus", "fm-shared-nvswitch-mode")),
    # The node side of the map is worth judging without FM; check_module_map skips
    # only its comparison with FM's modules when FM did not answer.
    Check("module-map", check_module_map, ("gpus",)),
)


def evaluate(facts: NodeFacts, checks: Sequence[Check] = CHECKS) -> list[CheckResult]:
    """Every check, in order, over ``facts``, skipping those whose needs failed (pure).

    Errors: ``ValueError`` when a check needs one listed after it (or not at all).
    """
    results: list[CheckResult] = []
    # Check name -> the failed checks at the root of its failure or skip.
    failed_roots: dict[str, tuple[str, ...]] = {}
    for check in checks:
        unknown = [n for n in check.needs if n not in {r.name for r in results}]
        if unknown:
            raise ValueError(f"check {check.name} needs {', '.join(unknown)}, not run before it")
        roots = tuple(dict.fromkeys(r for n in check.needs for r in failed_roots.get(n, ())))
        result = CheckResult.skipped(check.name, roots) if roots else check.judge(facts)
        if result.status is Status.FAIL:
            failed_roots[check.name] = (check.name,)
        elif roots:
            failed_roots[check.name] = roots
        results.append(result)
    return results


NODE_ROOTS = Roots()  # the real node's paths


def run_checks(
    roots: Roots = NODE_ROOTS,
    *,
    gpu_device_ids: Mapping[str, str],
    module_map: Mapping[int, str],
    list_partitions: ListPartitions | None = None,
    fm: FmAnswer | None = None,
    inventory_path: Path | None = None,
) -> list[CheckResult]:
    """Read the node under ``roots``, ask FM once (if a lister is given), run every check.

    ``fm`` takes an answer obtained elsewhere (e.g. ``ask_fabric_manager_async``); it
    wins over ``list_partitions``.
    Errors: ``ValueError`` for a malformed ``gpu_device_ids`` key.
    """
    if fm is None and list_partitions is not None:
        fm = ask_fabric_manager(list_partitions)
    facts = read_facts(
        roots,
        gpu_device_ids=gpu_device_ids,
        module_map=module_map,
        fm=fm,
        inventory_path=inventory_path,
    )
    return evaluate(facts)


def format_report(results: Sequence[CheckResult]) -> str:
    """Human-readable report: one line per check, the fix indented below it."""
    lines = []
    for r in results:
        lines.append(f"[{r.status.name}] {r.name}: {r.detail}")
        if r.fix:
            lines.append(f"       fix: {r.fix}")
    counts = {s: sum(1 for r in results if r.status is s) for s in Status}
    lines.append(
        f"{counts[Status.PASS]} passed, {counts[Status.WARN]} warning(s), "
        f"{counts[Status.FAIL]} failed, {counts[Status.SKIP]} skipped"
    )
    return "\n".join(lines) + "\n"


def exit_code(results: Sequence[CheckResult]) -> int:
    """0 when nothing failed (warnings and skips allowed), 1 otherwise."""
    return 1 if any(r.status is Status.FAIL for r in results) else 0
