"""betterproto2 code generated from ``proto/`` by ``tools/gen_proto.py``.

Do not edit: run the tool. Modules follow the proto packages: ``v1beta1`` is the
kubelet device plugin API, ``v1`` the kubelet PodResources API, ``pluginregistration``
the kubelet plugin registration API (used by DRA), and
``k8s.io.kubelet.pkg.apis.dra.v1`` / ``.v1beta1`` the kubelet DRA plugin API (the
package's full name is part of the gRPC method path the kubelet calls, so it is kept).
Python names differ from the proto names (``ID`` -> ``id``, ``NUMANode`` -> ``NumaNode``,
``deviceIDs`` -> ``device_i_ds``); the wire format is the kubelet's.
"""
