"""Valid but risky settings: logged and audited (``config_warning``) when a server
starts, printed by ``wsguard check-config``."""

from __future__ import annotations

from ipaddress import ip_network

from wsguard.config.model import Config
from wsguard.core.auth import auth_warnings
from wsguard.core.client_address import is_loopback_host


def config_warnings(config: Config) -> list[tuple[str, str]]:
    """Valid but risky settings of the whole configuration, as (config key, message):
    :func:`auth_warnings`, a proxy network that trusts every address, an admin listener
    in clear text beyond loopback, message types delivered without a schema."""
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
    admin = config.admin
    if admin.enabled and admin.tls.cert_file is None and not is_loopback_host(admin.host):
        out.append(
            (
                "admin.host",
                "the admin listener is on a network address without admin.tls: the admin "
                "token and the dashboard's session cookie cross the network in clear text "
                "(set admin.tls.cert_file and admin.tls.key_file, or keep it on loopback "
                "behind a TLS proxy)",
            )
        )
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
