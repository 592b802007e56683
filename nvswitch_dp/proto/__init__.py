"""betterproto2 code generated from ``proto/`` by ``tools/gen_proto.py``.

Do not edit: run the tool. ``v1beta1`` is the kubelet device plugin API, ``v1`` the
kubelet PodResources API.
Python names differ from the proto names (``ID`` -> ``id``, ``NUMANode`` -> ``NumaNode``,
``deviceIDs`` -> ``device_i_ds``); the wire format is the kubelet's.
"""
