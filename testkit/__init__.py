"""Test helpers that play the node around the daemon (not installed: tests and benchmarks
import them from the repository).

- :mod:`testkit.kubelet` and :mod:`testkit.dra_kubelet`: kubelet stand-ins written with
  grpcio (Google's gRPC) from the published API definitions, independent of our
  betterproto2 code, so that a wire mistake on our side fails a test instead of
  cancelling out (the demo's own kubelets, in ``nvswitch_dp/demo/``, share our code).
- :mod:`testkit.dra_cluster`: a DRA node with its cluster (the demo's API server and
  scheduler, the grpcio DRA kubelet, the daemon as a process).
- :mod:`testkit.harness`: the real daemon as a child process.
- :mod:`testkit.faults`: the fault campaign.

Nothing here is imported by the daemon itself; grpcio is a development dependency.
"""
