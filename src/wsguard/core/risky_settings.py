"""Valid but risky settings: logged and audited (``config_warning``) when a server
starts, printed by ``wsguard check-config``."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, collapse_addresses, ip_network

from wsguard.config.model import Config
from wsguard.core.auth import auth_warnings
from wsguard.core.client_address import is_loopback_host, mapped_ipv4


def config_warnings(config: Config) -> list[tuple[str, str]]:
    """Valid but risky settings of the whole configuration, as (config key, message):
    :func:`auth_warnings`, a configuration file that holds secrets and others can read,
    proxy networks that together trust every IPv4 or every IPv6 address, an admin
    listener in clear text beyond loopback, message types delivered without a schema."""
    out = auth_warnings(config.auth)
    out += config.source_warnings
    everyone = _trusts_everyone(config.proxy.trusted)
    if everyone:
        out.append(
            (
                "proxy.trusted",
                f"{everyone} every address as a proxy: any client chooses the "
                "address its per-address limits, bans and audit lines are kept under "
                "(X-Forwarded-For); list only your proxies' networks",
            )
        )
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


def _trusts_everyone(trusted: tuple[str, ...]) -> str:
    """The networks of *trusted* that together hold every IPv4 or every IPv6 address
    (an IPv4-mapped IPv6 network, ``::ffff:0:0/96``, counts as the IPv4 addresses it
    maps), as configured: "0.0.0.0/0 trusts", "0.0.0.0/1, 128.0.0.0/1 together trust";
    "" when they do not."""
    v4: dict[str, IPv4Network] = {}
    v6: dict[str, IPv6Network] = {}
    for entry in trusted:
        network = ip_network(entry, strict=False)
        if isinstance(network, IPv4Network):
            v4[entry] = network
            continue
        v6[entry] = network
        mapped = mapped_ipv4(network)
        if mapped is not None:
            v4[entry] = mapped
    v4_all = list(collapse_addresses(v4.values())) == [IPv4Network("0.0.0.0/0")]
    v6_all = list(collapse_addresses(v6.values())) == [IPv6Network("::/0")]
    entries = list(v6) if v6_all else list(v4) if v4_all else []
    if len(entries) > 1:
        return f"{', '.join(entries)} together trust"
    return f"{entries[0]} trusts" if entries else ""
