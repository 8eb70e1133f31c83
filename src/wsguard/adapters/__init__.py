"""Compatibility: ``wsguard.adapters.asgi`` is the earlier name of :mod:`wsguard.asgi`."""
