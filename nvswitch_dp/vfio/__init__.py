"""The host's PCI side of a GPU: which functions are GPUs, and whether VFIO can use them.

General layout:

- :mod:`.pci_ids`: the vendor/device table (data; the default of ``vfio.gpu_device_ids``).
- :mod:`.discovery`: reads sysfs into frozen values (:class:`~.discovery.PciGpu`,
  :class:`~.discovery.VfioSnapshot`) and decides on them with pure functions
  (:func:`~.discovery.build_inventory`, :func:`~.discovery.decide_vfio_problem`).
- :mod:`.identity`: who each GPU is (module ID, bus ID, UUID, serial) and the
  ``nvidia-smi -q`` parser; :mod:`.nvml` reads the same through NVML (nvidia-ml-py).
- :mod:`.inventory`: the node inventory ``prepare-node`` writes and the daemon reads
  (module IDs remembered past the nvidia driver), and the pure decision of which module
  map to serve with.
- :mod:`.binding`: moving GPUs (and their IOMMU groups) to vfio-pci: the plan, the
  checks before it (open GPUs, NVSwitches), its execution through a ``PciKernel``.
- :mod:`.simulate` (a package): writes a faithful fake sysfs, /dev and /proc tree for
  tests, ``--simulate`` and the demo (:mod:`.simulate.build`), plus fault injection
  (:mod:`.simulate.faults`: unbind, missing group node, foreign function) and
  :class:`~.simulate.kernel.SimulatedKernel`, the driver-binding interface as the kernel
  behaves; :mod:`.nvidia_smi_sim` prints ``nvidia-smi -q`` for it.
"""
