"""The kubelet edge: one grpclib DevicePlugin server per resource and its lifecycle.

``service`` answers the kubelet's calls for one resource; ``lifecycle`` serves it on a
socket, registers it, and serves and registers again when the kubelet restarts;
``grpc_trio`` is the only module that knows grpclib runs on asyncio under Trio.
"""
