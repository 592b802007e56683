"""The pure core: partition table, partition state, allocation policy.

Rule 1 (after h11): everything that decides whether a partition may be handed out lives
here, synchronous and free of I/O. Nothing in this package imports trio, grpclib, os or
any backend; the edges feed it facts and act on its answers.
"""
