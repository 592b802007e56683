"""Test and demo helpers that play the node around the daemon.

- :mod:`nvswitch_dp.testing.kubelet`: a kubelet stand-in written with grpcio (Google's
  gRPC) from the published API definitions, independent of our betterproto2 code.
- :mod:`nvswitch_dp.testing.harness`: the real daemon as a child process.

Nothing here is imported by the daemon itself; grpcio is a development dependency.
"""
