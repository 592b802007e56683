"""A faithful fake sysfs, /dev and /proc tree of an HGX node, the kernel's driver-binding
rules over it, and faults to inject into it.

Used by ``--simulate``, ``doctor --simulate``, the demo and the tests (Intel's
``createTestFiles`` pattern).

General layout, each module resting only on those above it:

- :mod:`.node`: the node as a value (:class:`~.node.SimulatedNode`, its functions and
  GPU identities), the marker file beside its sysfs, and the readers of the tree.
- :mod:`.tree`: the mechanics every change goes through: creating a function, a driver
  taking or releasing one (``/dev/vfio/<group>``, the nvidia driver's procfs entry and
  device nodes), what loading a module leaves behind.
- :mod:`.build`: :func:`build_simulated_node` writes a platform's tree;
  :func:`load_simulated_node` reads one back from its marker.
- :mod:`.faults`: faults and their inverses (drivers changed, ``/dev/vfio`` nodes lost,
  functions added or hot-unplugged, processes holding a device open).
- :mod:`.kernel`: :class:`SimulatedKernel`, the attribute writes and ``modprobe`` as the
  kernel answers them (a :class:`~nvswitch_dp.ports.PciKernel`).

The three entry points a caller starts from are importable from here; everything else
from its module.

Ownership: everything here writes only under the roots of the node it is given (the
builder deletes and re-creates ``<root>/sys``, ``<root>/dev`` and ``<root>/proc``).
"""

from __future__ import annotations

from nvswitch_dp.vfio.simulate.build import build_simulated_node, load_simulated_node
from nvswitch_dp.vfio.simulate.kernel import SimulatedKernel

__all__ = ["SimulatedKernel", "build_simulated_node", "load_simulated_node"]
