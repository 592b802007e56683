"""Fabric Manager: the typed report, the typed errors, and the backends that reach FM.

Backends implement :class:`nvswitch_dp.ports.FabricManagerClient`; everything above them
speaks FM's own terms (partition IDs, module IDs, FM return codes).
"""
