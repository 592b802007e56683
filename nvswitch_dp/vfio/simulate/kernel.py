"""The kernel's PCI driver-binding interface over a simulated tree: the sysfs attribute
writes (``driver_override``, ``bind``, ``unbind``, ``drivers_probe``, ``new_id``,
``remove_id``, ``drivers_autoprobe``) and ``modprobe``, with the rules of Linux (v6.x)
that decide which driver takes which device (:class:`SimulatedKernel`'s docstring).

Ownership: writes only under the node's roots, and the dynamic IDs into the node's marker.
Errors: ``OSError`` with the kernel's errno, as the real attribute writes raise it;
:class:`~nvswitch_dp.vfio.simulate.node.SimulationError` where the tree or its marker
cannot hold the change.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nvswitch_dp.vfio.discovery import NVIDIA_DRIVER, VFIO_DRIVER
from nvswitch_dp.vfio.pci_ids import is_bridge
from nvswitch_dp.vfio.simulate.build import load_simulated_node
from nvswitch_dp.vfio.simulate.node import (
    SimulatedNode,
    SimulationError,
    current_driver,
    device_link,
    function_addresses,
    read_hex_attribute,
    read_marker,
    write_marker,
)
from nvswitch_dp.vfio.simulate.tree import (
    MODULE_CLOSURE,
    attach_driver,
    detach_driver,
    insert_modules,
)

_ANY = 0xFFFFFFFF  # PCI_ANY_ID
_PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class _PciId:
    """One ``struct pci_device_id``: what a driver's ID table (or ``new_id``) matches."""

    vendor: int
    device: int
    subvendor: int = _ANY
    subdevice: int = _ANY
    pci_class: int = 0
    class_mask: int = 0

    def matches(self, dev: _PciDev) -> bool:
        """``pci_match_one_device`` (drivers/pci/pci.h)."""
        return (
            self.vendor in (_ANY, dev.vendor)
            and self.device in (_ANY, dev.device)
            and self.subvendor in (_ANY, dev.subvendor)
            and self.subdevice in (_ANY, dev.subdevice)
            and not ((self.pci_class ^ dev.pci_class) & self.class_mask)
        )

    def as_list(self) -> list[int]:
        return [
            self.vendor,
            self.device,
            self.subvendor,
            self.subdevice,
            self.pci_class,
            self.class_mask,
        ]


@dataclass(frozen=True, slots=True)
class _PciDev:
    """A function's IDs as sysfs shows them, with its override and driver."""

    address: str
    vendor: int
    device: int
    subvendor: int
    subdevice: int
    pci_class: int
    override: str | None
    driver: str | None


# Static ID tables of the drivers the tree knows. vfio-pci's own table is one
# override-only entry (PCI_DRIVER_OVERRIDE_DEVICE_VFIO(PCI_ANY_ID, PCI_ANY_ID) in
# drivers/vfio/pci/vfio_pci.c): it matches nothing without driver_override, which
# _matches() handles for every driver.
_ID_TABLES: Mapping[str, tuple[_PciId, ...]] = {
    # nv_pci_table (open-gpu-kernel-modules kernel-open/nvidia/nv-pci-table.c): vendor
    # 10de, class VGA or 3D controller exactly. The NVSwitch entry is the tree's (build.py).
    NVIDIA_DRIVER: (
        _PciId(0x10DE, _ANY, pci_class=0x030000, class_mask=0xFFFFFF),
        _PciId(0x10DE, _ANY, pci_class=0x030200, class_mask=0xFFFFFF),
        _PciId(0x10DE, _ANY, pci_class=0x068000, class_mask=0xFFFF00),
    ),
    # port_pci_ids (drivers/pci/pcie/portdrv.c): PCI-to-PCI bridges, normal and subtractive.
    "pcieport": (
        _PciId(_ANY, _ANY, pci_class=0x060400, class_mask=0xFFFFFF),
        _PciId(_ANY, _ANY, pci_class=0x060401, class_mask=0xFFFFFF),
    ),
    # azx_ids (sound/pci/hda/hda_intel.c): NVIDIA's HD-audio class entry.
    "snd_hda_intel": (_PciId(0x10DE, _ANY, pci_class=0x040300, class_mask=0xFFFFFF),),
    VFIO_DRIVER: (),
}
# Drivers are tried in the order they registered (bus->p->klist_drivers): pcieport is
# built in, nvidia and snd_hda_intel load at boot, vfio-pci later. Others follow by name.
_REGISTRATION_ORDER = ("pcieport", NVIDIA_DRIVER, "snd_hda_intel", VFIO_DRIVER)


def _os_error(code: int, path: Path | str, detail: str) -> OSError:
    return OSError(code, f"{os.strerror(code)} ({detail})", str(path))


def _id_fields(path: Path, text: str, limit: int) -> list[int]:
    """``new_id``/``remove_id``'s ``sscanf(buf, "%x %x ...")``: up to ``limit`` leading hex
    fields, stopping at the first that is not; ``EINVAL`` unless vendor and device are
    there."""
    fields: list[int] = []
    for token in text.split()[:limit]:
        try:
            fields.append(int(token, 16))
        except ValueError:
            break
    if len(fields) < 2:
        raise _os_error(errno.EINVAL, path, f"{text!r} is not 'vendor device' in hex")
    return fields


class SimulatedKernel:
    """The kernel's PCI driver-binding interface over a simulated tree
    (:class:`~nvswitch_dp.ports.PciKernel`).

    Constructed from the :class:`SimulatedNode` (or :meth:`for_sysfs` with only the sysfs
    root, through the marker). Stateless itself: everything lives in the tree and the
    marker, so any number of instances, in any processes, see the same node.

    Rules, from Linux (v6.x) unless said otherwise; the ``value`` is what a ``write(2)``
    would carry, and an address matches a device's name as ``sysfs_streq`` does (one
    trailing newline ignored, case-sensitive):

    - ``<sys>/bus/pci/devices/<a>/driver_override`` (``driver_override_store``,
      drivers/pci/pci-sysfs.c, via ``driver_set_override`` in drivers/base/driver.c): the
      text up to the first newline becomes the override; ``""`` or ``"\\n"`` clears it,
      and the file then reads ``(null)``. Binds nothing. ``EINVAL`` from a page long.
    - ``<sys>/bus/pci/drivers/<d>/unbind`` (``unbind_store``, drivers/base/bus.c): releases
      the device; ``ENODEV`` when there is no such device or it is not bound to ``<d>``.
    - ``<sys>/bus/pci/drivers_probe`` (``drivers_probe_store`` -> ``device_attach``,
      drivers/base/bus.c and dd.c): an unbound device goes to the first loaded driver,
      in registration order, that matches and whose probe succeeds; none: it stays
      unbound, not an error. A bound device stays as it is. ``ENODEV`` for no such
      device. Matching is ``pci_match_device`` (drivers/pci/pci-driver.c): with
      ``driver_override`` set only that driver matches, and it always does (so a
      not-loaded override driver leaves the device unbound); otherwise a dynamic ID
      (``new_id``) or the static table does: ``nvidia`` takes NVIDIA VGA/3D-class
      functions (and the tree's NVSwitches), ``pcieport`` bridges, and vfio-pci nothing
      but its dynamic IDs.
    - ``<sys>/bus/pci/drivers/<d>/bind`` (``bind_store``, drivers/base/bus.c):
      ``ENODEV`` unless the device exists and ``<d>`` matches it (override respected),
      ``EBUSY`` when it is bound already (to any driver), else the probe's error.
    - ``<sys>/bus/pci/drivers/<d>/new_id`` (``new_id_store``, drivers/pci/pci-driver.c):
      ``"vvvv dddd [ssvv ssdd cccccc mmmmmm]"`` in hex (fewer than two fields:
      ``EINVAL``; an ID the driver matches already: ``EEXIST``); adds a dynamic ID, then
      ``driver_attach`` binds every *unbound* device that now matches. A bound device is
      never taken from its driver. ``remove_id`` (``remove_id_store``) drops one
      (``ENODEV`` if absent) and unbinds nothing.
    - ``<sys>/bus/pci/drivers_autoprobe``: ``"0..."`` turns off, anything else on, the
      probing a newly loaded driver does (``drivers_autoprobe_store``).
    - Probes: vfio-pci refuses a function whose header type is not normal, i.e. a bridge
      (``EINVAL``: ``vfio_pci_core_register_device`` in drivers/vfio/pci/vfio_pci_core.c,
      ``vfio_pci_probe`` in vfio_pci.c before 5.15), and a function without an IOMMU
      group (``EINVAL`` from ``vfio_iommu_group_get`` in drivers/vfio/group.c, unless
      the noiommu mode is on, which this tree never is); since 5.13 ``bind`` reports a probe's
      error, while ``drivers_probe`` and ``new_id`` go on to the next driver or device.
      Binding to vfio-pci creates ``/dev/vfio/<group>``; nvidia's probe creates the GPU's
      ``/proc/driver/nvidia`` entry and its remove takes it away (tree.py).
    - Any other path: ``ENOENT`` when it does not exist (``.../drivers/vfio-pci/bind``
      before vfio-pci is loaded), ``EISDIR`` for a directory, ``EACCES`` for an attribute
      the simulation does not model (kernfs answers ``EACCES`` for an attribute without a
      store), and for a path outside the simulated sysfs.

    :meth:`load_module` is the simulated ``modprobe``: ``vfio-pci`` (or ``vfio_pci``)
    leaves ``vfio``, ``vfio_iommu_type1``, ``vfio_pci_core`` and ``vfio_pci`` under
    ``<sys>/module``, the vfio-pci driver directory and ``/dev/vfio/vfio`` (made by the
    vfio module); a newly registered driver then attaches to the unbound devices it
    matches (``bus_add_driver`` -> ``driver_attach``; for vfio-pci those whose override
    names it). ``vfio_iommu_type1``, ``vfio``, ``vfio_pci_core`` and ``nvidia`` load
    likewise; a loaded module is left alone; any other name raises ``OSError``
    (``ENOENT``) naming it, as ``modprobe: FATAL: Module ... not found`` does.

    Errors: ``OSError`` with the kernel's errno as above; :class:`SimulationError` for a
    ``new_id``/``remove_id`` on a tree without the marker (dynamic IDs live there).
    """

    def __init__(self, node: SimulatedNode) -> None:
        self._node = node

    @classmethod
    def for_sysfs(cls, sysfs_root: Path) -> SimulatedKernel:
        """The kernel of the simulated tree at ``sysfs_root``.

        Errors: :class:`SimulationError` when ``sysfs_root`` holds no marker.
        """
        node = load_simulated_node(sysfs_root)
        if node is None:
            raise SimulationError(f"{sysfs_root} is not a simulated sysfs (no marker)")
        return cls(node)

    @property
    def node(self) -> SimulatedNode:
        return self._node

    # -- the PciKernel port ----------------------------------------------------------

    def write_attribute(self, path: Path, value: str) -> None:
        """Apply one write of ``value`` to the sysfs attribute ``path`` (class docstring)."""
        path = Path(path)
        if not path.exists():
            raise _os_error(errno.ENOENT, path, "no such sysfs attribute")
        target = path.resolve()
        if target.is_dir():
            raise _os_error(errno.EISDIR, path, "a directory, not an attribute")
        try:
            parts = target.relative_to(self._node.sysfs_root.resolve()).parts
        except ValueError:
            raise _os_error(errno.EACCES, path, "not in the simulated sysfs") from None
        if parts == ("bus", "pci", "drivers_probe"):
            self._drivers_probe(path, value)
        elif parts == ("bus", "pci", "drivers_autoprobe"):
            target.write_text("0\n" if value.startswith("0") else "1\n")
        elif (
            len(parts) == 5
            and parts[:3] == ("bus", "pci", "drivers")
            and parts[4]
            in (
                "bind",
                "unbind",
                "new_id",
                "remove_id",
            )
        ):
            driver, attribute = parts[3], parts[4]
            if attribute == "bind":
                self._bind_store(path, driver, value)
            elif attribute == "unbind":
                self._unbind_store(path, driver, value)
            elif attribute == "new_id":
                self._new_id(path, driver, value)
            else:
                self._remove_id(path, driver, value)
        elif target.name == "driver_override" and (target.parent / "vendor").is_file():
            self._driver_override(path, target, value)
        else:
            raise _os_error(errno.EACCES, path, "attribute not writable in the simulation")

    def load_module(self, name: str) -> None:
        """The simulated ``modprobe name`` (class docstring); loaded already: nothing."""
        closure = MODULE_CLOSURE.get(name.replace("-", "_"))
        if closure is None:
            raise OSError(
                errno.ENOENT,
                f"modprobe: FATAL: Module {name} not found in the simulated node "
                f"(it knows {', '.join(sorted(MODULE_CLOSURE))})",
            )
        for driver in insert_modules(self._node.sysfs_root, self._node.dev_root, closure):
            if self._autoprobe():
                self._driver_attach(driver)

    # -- stores ------------------------------------------------------------------------

    def _driver_override(self, path: Path, target: Path, value: str) -> None:
        if len(value.encode()) >= _PAGE_SIZE - 1:
            raise _os_error(errno.EINVAL, path, "override longer than a page")
        text = value.split("\0", 1)[0].split("\n", 1)[0]  # strlen, then up to a newline
        target.write_text(f"{text}\n" if text else "(null)\n")

    def _drivers_probe(self, path: Path, value: str) -> None:
        dev = self._device(path, value)
        if dev.driver is None:
            self._device_attach(dev)

    def _bind_store(self, path: Path, driver: str, value: str) -> None:
        dev = self._device(path, value)
        if not self._matches(driver, dev):
            raise _os_error(errno.ENODEV, path, f"{driver} does not match {dev.address}")
        if dev.driver is not None:
            raise _os_error(errno.EBUSY, path, f"{dev.address} is bound to {dev.driver}")
        failure = self._probe(driver, dev)
        if failure:
            raise _os_error(failure, path, f"{driver} probe of {dev.address} failed")

    def _unbind_store(self, path: Path, driver: str, value: str) -> None:
        dev = self._device(path, value)
        if dev.driver != driver:
            raise _os_error(
                errno.ENODEV, path, f"{dev.address} is bound to {dev.driver}, not {driver}"
            )
        detach_driver(self._node, dev.address)

    def _new_id(self, path: Path, driver: str, value: str) -> None:
        fields = _id_fields(path, value, 7)
        new = _PciId(*fields[:6])
        if len(fields) != 7:
            # The kernel matches a stand-in device carrying the new ID's fields.
            stand_in = _PciDev(
                "", new.vendor, new.device, new.subvendor, new.subdevice, new.pci_class, None, None
            )
            if self._matches(driver, stand_in):
                raise _os_error(errno.EEXIST, path, f"{driver} already matches {value!r}")
        ids = self._dynamic_ids()
        ids.setdefault(driver, []).append(new)
        self._save_dynamic_ids(ids)
        self._driver_attach(driver)

    def _remove_id(self, path: Path, driver: str, value: str) -> None:
        fields = _id_fields(path, value, 6)
        want = _PciId(*fields)
        ids = self._dynamic_ids()
        for i, have in enumerate(ids.get(driver, [])):
            if (
                (have.vendor, have.device) == (want.vendor, want.device)
                and want.subvendor in (_ANY, have.subvendor)
                and want.subdevice in (_ANY, have.subdevice)
                and not ((have.pci_class ^ want.pci_class) & want.class_mask)
            ):
                del ids[driver][i]
                self._save_dynamic_ids(ids)
                return
        raise _os_error(errno.ENODEV, path, f"{driver} has no dynamic ID {value!r}")

    # -- the driver core -----------------------------------------------------------------

    def _device_attach(self, dev: _PciDev) -> None:
        for driver in self._loaded_drivers():
            if self._matches(driver, dev) and not self._probe(driver, dev):
                return

    def _driver_attach(self, driver: str) -> None:
        for address in function_addresses(self._node.sysfs_root):
            dev = self._read_device(address)
            if dev.driver is None and self._matches(driver, dev):
                self._probe(driver, dev)

    def _matches(self, driver: str, dev: _PciDev) -> bool:
        if dev.override is not None:
            return dev.override == driver  # pci_match_device: only, and always, that one
        dynamic = self._dynamic_ids().get(driver, [])
        return any(i.matches(dev) for i in (*dynamic, *_ID_TABLES.get(driver, ())))

    def _probe(self, driver: str, dev: _PciDev) -> int:
        """Bind ``dev`` to ``driver`` as its probe would; 0, or the probe's errno."""
        if driver == VFIO_DRIVER and is_bridge(dev.pci_class):
            return errno.EINVAL
        if (
            driver == VFIO_DRIVER
            and not (device_link(self._node.sysfs_root, dev.address) / "iommu_group").exists()
        ):
            return errno.EINVAL  # vfio_iommu_group_get: no group, and no noiommu mode
        attach_driver(self._node, dev.address, driver)
        return 0

    # -- reading the tree ----------------------------------------------------------------

    def _device(self, path: Path, value: str) -> _PciDev:
        name = value[:-1] if value.endswith("\n") else value
        if name not in function_addresses(self._node.sysfs_root):
            raise _os_error(errno.ENODEV, path, f"no PCI device {name!r}")
        return self._read_device(name)

    def _read_device(self, address: str) -> _PciDev:
        directory = device_link(self._node.sysfs_root, address)
        try:
            override: str | None = (directory / "driver_override").read_text().rstrip("\n")
        except OSError:
            override = None
        return _PciDev(
            address=address,
            vendor=read_hex_attribute(directory, "vendor"),
            device=read_hex_attribute(directory, "device"),
            subvendor=read_hex_attribute(directory, "subsystem_vendor"),
            subdevice=read_hex_attribute(directory, "subsystem_device"),
            pci_class=read_hex_attribute(directory, "class"),
            override=None if override in (None, "(null)") else override,
            driver=current_driver(self._node.sysfs_root, address),
        )

    def _loaded_drivers(self) -> list[str]:
        try:
            present = {p.name for p in (self._node.sysfs_root / "bus/pci/drivers").iterdir()}
        except OSError:
            return []
        first = [d for d in _REGISTRATION_ORDER if d in present]
        return first + sorted(present - set(first))

    def _autoprobe(self) -> bool:
        try:
            text = (self._node.sysfs_root / "bus" / "pci" / "drivers_autoprobe").read_text()
        except OSError:
            return True
        return not text.startswith("0")

    def _dynamic_ids(self) -> dict[str, list[_PciId]]:
        content = read_marker(self._node.sysfs_root)
        if content is None:
            return {}
        try:
            return {
                driver: [_PciId(*(int(x) for x in entry)) for entry in entries]
                for driver, entries in dict(content.get("dynamic_ids", {})).items()
            }
        except (TypeError, ValueError) as exc:
            raise SimulationError(f"simulated-node marker: bad dynamic_ids ({exc})") from None

    def _save_dynamic_ids(self, ids: Mapping[str, list[_PciId]]) -> None:
        sysfs = self._node.sysfs_root
        content = read_marker(sysfs)
        if content is None:
            raise SimulationError(f"{sysfs} has no marker to keep dynamic IDs in")
        content["dynamic_ids"] = {d: [i.as_list() for i in v] for d, v in sorted(ids.items()) if v}
        write_marker(sysfs, content)
