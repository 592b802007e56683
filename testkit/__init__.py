"""Test helpers that play the node around the daemon (not installed: tests and benchmarks
import them from the repository).

- :mod:`testkit.kubelet`: a kubelet stand-in written with grpcio (Google's
  gRPC) from the published API definitions, independent of our betterproto2 code.
- :mod:`testkit.harness`: the real daemon as a child process.

Nothing here is imported by the daemon itself; grpcio is a development dependency.
"""
