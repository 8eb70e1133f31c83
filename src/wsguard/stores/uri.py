"""Store URIs: what they name, and their validation.

* ``memory://``: this node's own memory (the default).
* ``redis://[user:password@]host[:port][/db]`` (``rediss://`` over TLS): one Redis or
  Valkey server.
* ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://``):
  a Redis Cluster, found from any of the seed nodes listed.
* ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``
  (``rediss+sentinel://``): the current primary of *service*, as the listed Sentinels
  report it. The user and password are the Redis servers'; Sentinels are asked without.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

SCHEMES = (
    "memory",
    "redis",
    "rediss",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)

#: The schemes of the shared (cluster-wide) stores.
SHARED_SCHEMES = SCHEMES[1:]

Topology = Literal["single", "cluster", "sentinel"]

_DEFAULT_PORTS = {"single": 6379, "cluster": 6379, "sentinel": 26379}
_EXAMPLES = {
    "single": "redis://127.0.0.1:6379/0",
    "cluster": "redis+cluster://10.0.0.1:6379,10.0.0.2:6379",
    "sentinel": "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0",
}


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where a Redis store is: one server, a cluster's seed nodes, or Sentinels."""

    topology: Topology
    tls: bool
    #: the server (single), the seed nodes (cluster) or the Sentinels (sentinel)
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    service: str = ""
    username: str | None = None
    password: str | None = None


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def is_shared(uri: str) -> bool:
    """Whether *uri* names a store that every node of a cluster shares."""
    return scheme_of(uri) in SHARED_SCHEMES


def parse_redis_uri(uri: str) -> RedisAddress:
    """What a ``redis*://`` URI names; ValueError saying why when it names nothing usable."""
    scheme = scheme_of(uri)
    if scheme not in SHARED_SCHEMES:
        raise ValueError(
            "expected memory://, redis://host:port/db, rediss://host:port/db, "
            "redis+cluster://host:port,host:port or "
            "redis+sentinel://host:port,host:port/service/db "
            f"(got scheme {scheme or 'none'!r})"
        )
    rest = uri.split("://", 1)[1]
    if "#" in rest:
        raise ValueError("a store URI has no #fragment")
    try:
        return _parse(scheme, rest)
    except ValueError:
        ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
        if "@" in rest[min(ends, default=len(rest)) :]:
            # the user info ended early (a password holding "/" or "?"): what was parsed
            # from it is part of the password, never quoted back
            raise ValueError(
                "an '@' after the host: percent-encode '/', '?', '#', '@', '[' and ']' in "
                "the password (%2F, %3F, %23, %40, %5B, %5D)"
            ) from None
        raise


def _parse(scheme: str, rest: str) -> RedisAddress:
    base, _, kind = scheme.partition("+")
    topology: Topology = "cluster" if kind == "cluster" else "sentinel" if kind else "single"
    example = _EXAMPLES[topology]
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    if not at:
        hostlist = netloc
    username = password = None
    if userinfo:
        if "[" in userinfo or "]" in userinfo:  # the URI's own parser takes them for IPv6
            raise ValueError("percent-encode '[' and ']' in the user name and password (%5B, %5D)")
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    if not hostlist:
        raise ValueError(f"a {scheme}:// store URI needs a host, e.g. {example}")
    entries = hostlist.split(",")
    if len(entries) > 1 and topology == "single":
        raise ValueError(
            "redis:// names one server; for several use redis+cluster:// (a Redis "
            "Cluster) or redis+sentinel:// (Sentinels)"
        )
    hosts = tuple(_host_port(entry, _DEFAULT_PORTS[topology], example) for entry in entries)
    if len(set(hosts)) != len(hosts):
        raise ValueError("a host:port is listed twice")
    parts = path.split("/") if slash else []
    db_text = ""
    service = ""
    if topology == "single":
        db_text = path
        if "/" in path:
            raise ValueError(f"the database after the host must be a number (got {path!r})")
    elif topology == "cluster":
        if path not in ("", "0"):
            raise ValueError("a Redis Cluster has only database 0: nothing goes after the hosts")
    else:
        service = unquote(parts[0]) if parts else ""
        if not service:
            raise ValueError(f"name the monitored service after the Sentinels, e.g. {example}")
        if len(parts) > 2:
            raise ValueError(
                f"expected /service or /service/db after the Sentinels, e.g. {example}"
            )
        db_text = parts[1] if len(parts) == 2 else ""
    if db_text and not (db_text.isdigit() and int(db_text) < 16384):
        raise ValueError(f"the database after the host must be a number (got {db_text!r})")
    if query:
        # nothing reaches the Redis client behind the settings' back: a password given
        # there would be logged as part of the URI, a ?db= would part the keys from the
        # events' channels, ?ssl_cert_reqs=none would stop verifying the server
        raise ValueError(
            f"a {scheme}:// URI takes no ?options: the password goes before the host "
            f"({scheme}://:password@host), the database after it (/0), TLS trust in "
            "cluster.tls_ca_file, the rest in cluster.*"
        )
    return RedisAddress(
        topology=topology,
        tls=base == "rediss",
        hosts=hosts,
        db=int(db_text) if db_text else 0,
        service=service,
        username=username,
        password=password,
    )


def _host_port(entry: str, default: int, example: str) -> tuple[str, int]:
    try:
        parts = urlsplit("//" + entry)
        port = parts.port
    except ValueError:
        raise ValueError(
            f"invalid store URI: a port is 1-65535 and a host a name or an address, e.g. {example}"
        ) from None
    host = parts.hostname
    if not host or parts.path or parts.username is not None:
        raise ValueError(f"expected host:port, e.g. {example} (got a malformed host)")
    if port == 0:
        raise ValueError("the redis port must be 1-65535")
    return host, port if port is not None else default


def check_store_uri(uri: str) -> str:
    """Return *uri* if it names a usable store, else raise ValueError saying why."""
    if uri == "memory://":
        return uri
    parse_redis_uri(uri)
    return uri


def redacted(uri: str) -> str:
    """The URI without its password, for logs and messages, whatever characters the
    password holds (the URI is not parsed first: a malformed one is masked up to its
    last '@', over-masking being the safe side)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest:
        return uri
    ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
    end = min(ends, default=len(rest))
    if "@" in rest[:end]:
        userinfo, _, hosts = rest[:end].rpartition("@")
        hosts += rest[end:]
    else:  # the user info ends after a "/" or "?": a password holding one
        userinfo, _, hosts = rest.rpartition("@")
    if ":" not in userinfo:
        return uri
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hosts}"
