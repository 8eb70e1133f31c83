"""The checks, one module per family; importing this package registers them all."""

from wsguard.scanner.checks import (  # noqa: F401
    auth,
    authz,
    disclosure,
    handshake,
    lifecycle,
    limits,
    messages,
    origin,
    transport,
)
