"""Preflight checks for an HGX node: ``nvswitch-dp doctor``.

General layout (pure core, I/O at the edge):

* ``facts``: the readers (``read_*``), which take a root directory (``/proc``, ``/sys``,
  ``/dev``, FM's config file, a ``PATH``) and return plain values, and
  :class:`NodeFacts`, everything read. Tests point the readers at fake trees.
* ``checks_node`` (GPUs, IOMMU, VFIO, hugepages) and ``checks_fm`` (Fabric Manager, the
  module map): pure functions ``NodeFacts -> CheckResult``, each with a name, a
  :class:`Status`, a detail saying what was found, and a fix (the command or
  configuration change) whenever the status is WARN or FAIL. ``advice`` words the
  fixes for the programs this machine has.
* ``report``: which check needs which (:data:`CHECKS`); a check whose need failed is
  skipped and names that need, so the first failure printed is the one to fix first.
  :func:`run_checks` = read + check; :func:`format_report` and :func:`exit_code` turn
  the results into what the command prints and returns.
* ``fm``: finding FM's client and asking FM once; ``command``: :func:`doctor_main`, the
  command, which imports nothing of the daemon or the REST API.
"""

from nvswitch_dp.doctor.checks_fm import (
    check_fm_mode,
    check_fm_reachable,
    check_module_map,
    effective_module_map,
)
from nvswitch_dp.doctor.checks_node import (
    check_gpus,
    check_gpus_vfio,
    check_hugepages,
    check_iommu,
    check_vfio_modules,
    gpu_problem,
    iommu_fix,
)
from nvswitch_dp.doctor.command import doctor_main, doctor_parser
from nvswitch_dp.doctor.facts import (
    DEFAULT_FM_CONFIG,
    CheckResult,
    FmAnswer,
    GpuFacts,
    NodeFacts,
    Roots,
    Status,
    parse_fm_config,
    read_facts,
)
from nvswitch_dp.doctor.fm import ask_fabric_manager, ask_fabric_manager_async, find_fm_client
from nvswitch_dp.doctor.report import CHECKS, Check, evaluate, exit_code, format_report, run_checks

__all__ = [
    "CHECKS",
    "DEFAULT_FM_CONFIG",
    "Check",
    "CheckResult",
    "FmAnswer",
    "GpuFacts",
    "NodeFacts",
    "Roots",
    "Status",
    "ask_fabric_manager",
    "ask_fabric_manager_async",
    "check_fm_mode",
    "check_fm_reachable",
    "check_gpus",
    "check_gpus_vfio",
    "check_hugepages",
    "check_iommu",
    "check_module_map",
    "check_vfio_modules",
    "doctor_main",
    "doctor_parser",
    "effective_module_map",
    "evaluate",
    "exit_code",
    "find_fm_client",
    "format_report",
    "gpu_problem",
    "iommu_fix",
    "parse_fm_config",
    "read_facts",
    "run_checks",
]
