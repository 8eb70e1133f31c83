"""Valid but risky settings: logged and audited (``config_warning``) when a server
starts, printed by ``wsguard check-config``."""

from __future__ import annotations

from ipaddress import ip_network

from wsguard.config.model import Config
from wsguard.core.auth import auth_warnings


def config_warnings(config: Config) -> list[tuple[str, str]]:
    """Valid but risky settings of the whole configuration, as (config key, message):
    :func:`auth_warnings`, a proxy network that trusts every address, message types
    delivered without a schema."""
    out = auth_warnings(config.auth)
    for network in config.proxy.trusted:
        if ip_network(network, strict=False).prefixlen == 0:
            out.append(
                (
                    "proxy.trusted",
                    f"{network} trusts every address as a proxy: any client chooses the "
                    "address its per-address limits, bans and audit lines are kept under "
                    "(X-Forwarded-For); list only your proxies' networks",
                )
            )
            break
    if config.messages.format == "json":
        for name, spec in config.messages.types.items():
            if spec.schema_ is None and spec.schema_file is None and name != "auth":
                out.append(
                    (
                        f"messages.types.{name}",
                        "no schema: any JSON object of this type is delivered (only the "
                        "structural bounds, scopes and rates apply)",
                    )
                )
    return out
