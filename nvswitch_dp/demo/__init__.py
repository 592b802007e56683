"""``nvswitch-dp demo``: the product on a simulated node, end to end, in either mode.

General layout:

- :mod:`.session`: what both walk-throughs share (the demo directory, signals, the
  prepared node, the daemon as a child process, the REST API and its token);
- :mod:`.device_plugin` (``nvswitch-dp demo``) with :mod:`.kubelet`, the kubelet's
  device manager and PodResources server;
- :mod:`.dra` (``nvswitch-dp demo --mode dra``) with :mod:`.dra_kubelet` (plugin
  registration, Prepare/Unprepare), :mod:`.apistore` and :mod:`.apiserver` (the API
  server), :mod:`.dra_allocator` (the scheduler's allocator) and :mod:`.cluster`, which
  joins them for one node;
- :mod:`.wire`: the kubelets' grpclib plumbing under Trio.

Everything here ships with the product and needs nothing beyond its dependencies: the
kubelets are grpclib programs on our own generated code, the API server is the standard
library's HTTP server. (The tests check the daemon's wire format against grpcio stand-ins
of their own, in ``testkit/``.)
"""

from nvswitch_dp.demo.device_plugin import run_demo
from nvswitch_dp.demo.dra import run_dra_demo

__all__ = ["run_demo", "run_dra_demo"]
