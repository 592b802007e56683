"""The host's PCI side of a GPU: which functions are GPUs, and whether VFIO can use them.

General layout:

- :mod:`.pci_ids`: the vendor/device table (data; the default of ``vfio.gpu_device_ids``).
- :mod:`.discovery`: reads sysfs into frozen values (:class:`~.discovery.PciGpu`,
  :class:`~.discovery.VfioSnapshot`) and decides on them with pure functions
  (:func:`~.discovery.build_inventory`, :func:`~.discovery.decide_vfio_problem`).
- :mod:`.simulate`: writes a faithful fake sysfs and /dev tree for tests and
  ``--simulate``, plus fault injection (unbind, missing group node, foreign function).
"""
