"""The policy core: handshake requests in, decisions out; messages in, decisions out.

This package performs no network I/O and imports no event loop, socket,
server or Redis library (a test enforces it). Cluster-wide state is reached
through the abstract :class:`~wsguard.stores.base.Store` interface.
"""
