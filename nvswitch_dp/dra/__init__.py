"""DRA mode: the daemon as a Dynamic Resource Allocation driver (``run --mode dra``).

The node's Fabric Manager partitions are published to the API server as ResourceSlices
(one shared counter per GPU, every partition and per-GPU device consuming the counters of
its GPUs, so the scheduler never allocates two overlapping partitions); the kubelet's
DRAPlugin calls (NodePrepareResources / NodeUnprepareResources) activate and release
partitions through the same node core as the device-plugin mode, hand the devices to
containers through CDI spec files, and are remembered in an on-node checkpoint so a
restarted daemon still unprepares what it prepared.
"""
