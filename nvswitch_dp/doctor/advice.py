"""Pieces of fix text that depend on which programs this machine has. Pure.

A fix must not send the operator to a program that is not there (``lspci`` on a minimal
install, ``update-grub`` on a RHEL-like node, ``systemctl`` inside the plugin's
container). :func:`command_note` says where to get a missing one, and
:func:`kernel_parameters_fix` picks the boot-loader tool that exists. Both read only
``NodeFacts.commands``, the names found on the PATH when the facts were read.
"""

from __future__ import annotations

from nvswitch_dp.doctor.facts import NodeFacts

# Where each program the fixes name comes from, for a machine that lacks it. The
# systemd and boot-loader tools are absent in the plugin's container on purpose: the
# fix then runs on the node itself.
HOW_TO_GET = {
    "lspci": "package pciutils",
    "modprobe": "package kmod",
    "systemctl": "systemd; inside the plugin's container, run it on the node",
    "journalctl": "systemd; inside the plugin's container, run it on the node",
    "nvidia-smi": "the NVIDIA driver's utilities package (e.g. nvidia-utils-<branch>)",
}


def command_note(facts: NodeFacts, *names: str) -> str:
    """``""`` when every program in ``names`` is on this machine's PATH; otherwise a
    parenthesised note (with a leading space) naming each missing one and where it
    comes from."""
    by_source: dict[str, list[str]] = {}
    for name in names:
        if name not in facts.commands:
            by_source.setdefault(HOW_TO_GET.get(name, ""), []).append(name)
    if not by_source:
        return ""
    # Programs from the same source share one note (systemctl and journalctl: systemd).
    parts = [f"{', '.join(n)}: {how}" if how else ", ".join(n) for how, n in by_source.items()]
    return f" (not on this machine's PATH: {'; '.join(parts)})"


def kernel_parameters_fix(facts: NodeFacts, parameters: str) -> str:
    """How to add ``parameters`` to the kernel command line and boot with them, using the
    boot-loader tool this machine has: ``update-grub`` (Debian, Ubuntu), ``grubby``
    (RHEL-like), ``grub2-mkconfig``; with none of them, the step in words."""
    edit = f'add "{parameters}" to GRUB_CMDLINE_LINUX in /etc/default/grub, then '
    if "update-grub" in facts.commands:
        return edit + "`sudo update-grub && sudo reboot`"
    if "grubby" in facts.commands:
        return f'`sudo grubby --update-kernel=ALL --args="{parameters}" && sudo reboot`'
    if "grub2-mkconfig" in facts.commands:
        return edit + "`sudo grub2-mkconfig -o /boot/grub2/grub.cfg && sudo reboot`"
    return (
        f'add "{parameters}" to the kernel command line with the node\'s boot-loader tool '
        "and reboot (none of update-grub, grubby or grub2-mkconfig is on this machine's "
        "PATH; inside the plugin's container, do it on the node)"
    )
