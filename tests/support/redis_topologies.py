"""Real Redis topologies for cluster-mode tests, on free loopback ports.

* :class:`ClusterTopology`: a Redis Cluster of 3 primaries and 3 replicas
  (``redis-server --cluster-enabled yes``, joined by ``redis-cli --cluster create``);
* :class:`SentinelTopology`: one primary, one replica and 3 Sentinels
  (``redis-server sentinel.conf --sentinel``).

Every process is a real ``redis-server`` without persistence, in a directory of its own
(a cluster node keeps its ``nodes.conf`` there, a Sentinel its rewritten config), so a
killed node restarted on the same port rejoins as a replica. Nothing sleeps for a fixed
time: every wait polls with a deadline. The fixtures at the end start one of each per
test session (the store contract runs on them, emptied between tests); the fault tests
start their own with :func:`cluster_topology` / :func:`sentinel_topology`.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from redis.crc import key_slot

from support.net import free_port
from support.redis_process import REDIS_SERVER

REDIS_CLI = "redis-cli"

#: A node is declared failed after this long (``cluster-node-timeout``), and a Sentinel
#: declares the primary down after this long (``down-after-milliseconds``): short, so a
#: failover takes a few seconds, not so short that a busy machine fails over by itself.
FAILOVER_MS = 1000
#: The same for the topologies shared by a whole session, which nothing kills: long, so
#: that no failover happens on its own while the machine is busy.
SESSION_FAILOVER_MS = 10_000


class TopologyError(RuntimeError):
    """A topology did not reach the state a test needs within its deadline."""


def wait_for(check: Callable[[], bool], within: float, what: str) -> None:
    """Poll *check* (exceptions count as not yet) until true; TopologyError after *within*."""
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last})" if last is not None else ""
            raise TopologyError(f"{what}: not within {within}s{detail}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Tls:
    """A private CA (``trustme``) and the certificate every node of a topology serves."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, workdir: Path) -> Tls:
        workdir.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        tls = cls(workdir / "ca.pem", workdir / "redis.pem", workdir / "redis.key")
        ca.cert_pem.write_to_path(str(tls.ca_file))
        cert.cert_chain_pems[0].write_to_path(str(tls.cert_file))
        cert.private_key_pem.write_to_path(str(tls.key_file))
        return tls

    def server_args(self) -> list[str]:
        """TLS only (no plaintext port), for clients and for replication."""
        return [
            "--tls-cert-file", str(self.cert_file),
            "--tls-key-file", str(self.key_file),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", "no",
            "--tls-replication", "yes",
        ]  # fmt: skip

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca_file)]


class Node:
    """One redis-server process (a data node or a Sentinel); killed and restarted in place."""

    def __init__(
        self, workdir: Path, args: list[str], *, sentinel: bool = False, tls: Tls | None = None
    ) -> None:
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed (scripts/test.sh installs it from apt)")
        self.workdir = workdir
        self.port = free_port()
        self.args = args
        self.sentinel = sentinel
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(self) -> None:
        """Start the process (without waiting for it to answer)."""
        assert REDIS_SERVER is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.sentinel:
            command = [REDIS_SERVER, str(self.workdir / "sentinel.conf"), "--sentinel"]
        else:
            ports = ["--port", str(self.port)]
            if self.tls is not None:
                ports = ["--port", "0", "--tls-port", str(self.port), *self.tls.server_args()]
            command = [
                REDIS_SERVER,
                *ports,
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", "redis.log",
                "--repl-diskless-sync-delay", "0",  # replicas in sync at once, not after 5 s
                *self.args,
            ]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, within: float = 10.0) -> None:
        def answers() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise TopologyError(f"redis-server on port {self.port} exited")
            with self.client() as client:
                return bool(client.ping())

        wait_for(answers, within, f"redis-server on port {self.port} to answer")

    def start(self) -> Node:
        self.spawn()
        self.wait_ready()
        return self

    def client(self, timeout: float = 2.0) -> redis.Redis:
        if self.tls is not None:
            return redis.Redis(
                host="127.0.0.1",
                port=self.port,
                socket_timeout=timeout,
                ssl=True,
                ssl_ca_certs=str(self.tls.ca_file),
            )
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: what a crash does (no persistence: its data is gone)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.info(section))

    def commandstats(self) -> dict[str, int]:
        """Calls per command (``INFO commandstats``), subcommands folded into their command."""
        calls: dict[str, int] = {}
        for key, value in self.info("commandstats").items():
            name = key.removeprefix("cmdstat_").split("|", 1)[0]
            calls[name] = calls.get(name, 0) + int(value["calls"])
        return calls


# -- Redis Cluster ----------------------------------------------------------------------


class ClusterTopology:
    """A Redis Cluster on loopback: *primaries* primaries with *replicas* replicas each."""

    def __init__(
        self,
        workdir: Path,
        primaries: int = 3,
        replicas: int = 1,
        *,
        tls: bool = False,
        node_timeout_ms: int = FAILOVER_MS,
    ) -> None:
        self.workdir = workdir
        self.primaries_wanted = primaries
        self.tls = Tls.create(workdir / "tls") if tls else None
        self.nodes: list[Node] = []
        self.bus_ports: list[int] = []
        for n in range(primaries * (1 + replicas)):
            bus = free_port()
            args = [
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
            ]  # fmt: skip
            if self.tls is not None:
                args += ["--tls-cluster", "yes"]
            self.nodes.append(Node(workdir / f"node{n}", args, tls=self.tls))
            self.bus_ports.append(bus)
        self.replicas = replicas

    @property
    def uri(self) -> str:
        """Three seed nodes, as an operator would list them."""
        scheme = "rediss+cluster" if self.tls is not None else "redis+cluster"
        return f"{scheme}://" + ",".join(n.address for n in self.nodes[:3])

    def _cli(self) -> list[str]:
        return [REDIS_CLI, *(self.tls.cli_args() if self.tls is not None else [])]

    def start(self) -> ClusterTopology:
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_ready()
        if self.primaries_wanted < 3:  # redis-cli creates clusters of 3 primaries or more
            self._join_by_hand()
            self.wait_healthy()
            return self
        create = subprocess.run(
            [
                *self._cli(), "--cluster", "create", *(n.address for n in self.nodes),
                "--cluster-replicas", str(self.replicas), "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise TopologyError(f"redis-cli --cluster create failed: {create.stdout[-500:]}")
        self.wait_healthy()
        return self

    def _join_by_hand(self) -> None:
        """What ``redis-cli --cluster create`` does: slots split evenly over the first
        nodes, every node met, each of the others a replica of a primary in turn."""
        primaries = self.nodes[: self.primaries_wanted]
        step = 16384 // len(primaries)
        for n, node in enumerate(primaries):
            high = 16383 if n == len(primaries) - 1 else (n + 1) * step - 1
            with node.client() as client:
                client.execute_command("CLUSTER ADDSLOTSRANGE", n * step, high)
        with self.nodes[0].client() as client:
            for node, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                client.execute_command("CLUSTER MEET", "127.0.0.1", node.port, bus)

        def met() -> bool:
            return all(
                _cluster_info(node).get("cluster_known_nodes") == str(len(self.nodes))
                for node in self.nodes
            )

        wait_for(met, 20, "the cluster nodes to meet")
        for n, node in enumerate(self.nodes[len(primaries) :]):
            with primaries[n % len(primaries)].client() as client:
                primary_id = _text(client.execute_command("CLUSTER MYID"))

            def replicated(node: Node = node, primary_id: str = primary_id) -> bool:
                with node.client() as client:  # retried until the node knows the primary
                    return bool(client.execute_command("CLUSTER REPLICATE", primary_id))

            wait_for(replicated, 20, f"{node.address} to replicate {primary_id}")

    def node_at(self, address: str) -> Node:
        return next(n for n in self.nodes if n.address == address)

    def view(self, node: Node | None = None) -> list[dict[str, Any]]:
        """``CLUSTER NODES`` as one node sees it: id, address, flags, primary id, slots."""
        asked = node or next(n for n in self.nodes if n.alive)
        with asked.client() as client:
            text = client.execute_command("CLUSTER", "NODES")  # unparsed
        if isinstance(text, bytes):
            text = text.decode()
        out = []
        for line in str(text).splitlines():
            fields = line.split()
            out.append(
                {
                    "id": fields[0],
                    "address": fields[1].split("@", 1)[0],
                    "flags": set(fields[2].split(",")),
                    "primary": fields[3],
                    "slots": fields[8:],
                }
            )
        return out

    def primaries(self) -> list[Node]:
        """The live nodes that serve slots, as a live node sees the cluster."""
        return [
            self.node_at(entry["address"])
            for entry in self.view()
            if "master" in entry["flags"] and entry["slots"] and "fail" not in entry["flags"]
        ]

    def primary_of(self, key: str) -> Node:
        """The node serving *key*'s hash slot."""
        return self.owner_of_slot(key_slot(key.encode()))

    def replica_of(self, primary: Node) -> Node:
        entries = self.view()
        primary_id = next(e["id"] for e in entries if e["address"] == primary.address)
        return next(
            self.node_at(e["address"])
            for e in entries
            if e["primary"] == primary_id and "fail" not in e["flags"]
        )

    def healthy(self) -> bool:
        """Every live node: cluster state ok, all slots served by live primaries, every
        node known, every replica in sync with its primary."""
        live = [n for n in self.nodes if n.alive]
        for node in live:
            info = _cluster_info(node)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                return False
        for entry in self.view():
            if "fail" in entry["flags"] or "fail?" in entry["flags"]:
                if self.node_at(entry["address"]).alive:
                    return False
            elif "slave" in entry["flags"]:
                replication = self.node_at(entry["address"]).info("replication")
                if replication.get("master_link_status") != "up":
                    return False
        return len(self.primaries()) == self.primaries_wanted

    def wait_healthy(self, within: float = 30.0) -> None:
        wait_for(self.healthy, within, "the Redis Cluster to be healthy")

    def kill(self, node: Node) -> None:
        node.kill()

    def wait_promoted(self, dead: Node, within: float = 20.0) -> Node:
        """Wait until another node serves the slots *dead* served; return it."""
        entries = {e["address"]: e for e in self.view()}
        slots = entries[dead.address]["slots"]

        def promoted() -> bool:
            for entry in self.view():
                if entry["address"] != dead.address and entry["slots"] == slots:
                    return "master" in entry["flags"]
            return False

        wait_for(promoted, within, f"a replica of {dead.address} to be promoted")
        return next(
            self.node_at(e["address"])
            for e in self.view()
            if e["address"] != dead.address and e["slots"] == slots
        )

    def restart(self, node: Node) -> None:
        """Start a killed node again on its port: it rejoins (as a replica after a failover)."""
        node.start()

    def reshard(self, source: Node, target: Node, slots: int) -> None:
        """Move *slots* hash slots, keys included, from *source* to *target*."""
        self.wait_agreed()
        ids = {e["address"]: e["id"] for e in self.view()}
        done = subprocess.run(
            [
                *self._cli(), "--cluster", "reshard", source.address,
                "--cluster-from", ids[source.address],
                "--cluster-to", ids[target.address],
                "--cluster-slots", str(slots),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise TopologyError(f"redis-cli --cluster reshard failed: {done.stdout[-500:]}")

    def move_slot(
        self, slot: int, target: Node, between: Callable[[], object] | None = None
    ) -> Node:
        """Move one hash slot and its keys to *target* the way ``redis-cli --cluster
        reshard`` does (``CLUSTER SETSLOT`` IMPORTING / MIGRATING, ``MIGRATE`` of its
        keys, ``SETSLOT NODE``); *between* runs after the keys moved and before the slot
        is handed over, while clients get ASK redirections. Returns the former owner."""
        ids = {e["address"]: e["id"] for e in self.view()}
        source = self.owner_of_slot(slot)
        if source is target:
            return source
        with source.client(5) as src, target.client(5) as dst:
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source.address])
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target.address])
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            if between is not None:
                between()
            for node in (target, source, *self.primaries()):
                with node.client(5) as client:
                    client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target.address])
        self.wait_agreed()
        return source

    def wait_agreed(self, within: float = 20.0) -> None:
        """Wait until every live node sees the same slots on the same primaries."""

        def assignment(node: Node) -> set[tuple[str, str]]:
            return {
                (entry["address"], " ".join(sorted(entry["slots"])))
                for entry in self.view(node)
                if "master" in entry["flags"] and entry["slots"]
            }

        def agreed() -> bool:
            views = [assignment(n) for n in self.nodes if n.alive]
            return all(view == views[0] for view in views)

        wait_for(agreed, within, "the cluster nodes to agree on the slots")

    def owner_of_slot(self, slot: int) -> Node:
        with next(n for n in self.nodes if n.alive).client() as client:
            shards = client.execute_command("CLUSTER SLOTS")
        for shard in shards:
            if int(shard[0]) <= slot <= int(shard[1]):
                return self.node_at(f"127.0.0.1:{int(shard[2][1])}")
        raise TopologyError(f"no node serves slot {slot}")

    def slots_of(self, node: Node) -> set[int]:
        """The hash slots *node* serves."""
        entry = next(e for e in self.view() if e["address"] == node.address)
        out: set[int] = set()
        for item in entry["slots"]:
            if item.startswith("["):  # a slot being imported or migrated
                continue
            low, _, high = item.partition("-")
            out.update(range(int(low), int(high or low) + 1))
        return out

    def flush(self) -> None:
        for node in self.primaries():
            with node.client() as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def _cluster_info(node: Node) -> dict[str, str]:
    with node.client() as client:
        text = client.execute_command("CLUSTER", "INFO")
    if isinstance(text, bytes):
        text = text.decode()
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    pairs = (line.split(":", 1) for line in str(text).splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


# -- Sentinel ---------------------------------------------------------------------------

SERVICE = "wsguard-primary"


class SentinelTopology:
    """One primary, *replicas* replicas and 3 Sentinels (quorum 2) watching them."""

    def __init__(
        self,
        workdir: Path,
        replicas: int = 1,
        sentinels: int = 3,
        *,
        tls: bool = False,
        down_after_ms: int = FAILOVER_MS,
    ) -> None:
        self.workdir = workdir
        self.down_after_ms = down_after_ms
        self.tls = Tls.create(workdir / "tls") if tls else None
        self.data = [Node(workdir / f"redis{n}", [], tls=self.tls) for n in range(1 + replicas)]
        for replica in self.data[1:]:
            replica.args = ["--replicaof", "127.0.0.1", str(self.data[0].port)]
        self.sentinels = [
            Node(workdir / f"sentinel{n}", [], sentinel=True, tls=self.tls)
            for n in range(sentinels)
        ]

    @property
    def uri(self) -> str:
        hosts = ",".join(s.address for s in self.sentinels)
        scheme = "rediss+sentinel" if self.tls is not None else "redis+sentinel"
        return f"{scheme}://{hosts}/{SERVICE}/0"

    def _write_sentinel_conf(self, sentinel: Node) -> None:
        sentinel.workdir.mkdir(parents=True, exist_ok=True)
        primary = self.data[0]
        if self.tls is None:
            ports = f"port {sentinel.port}\n"
        else:
            ports = (
                f"port 0\ntls-port {sentinel.port}\n"
                f"tls-cert-file {self.tls.cert_file}\ntls-key-file {self.tls.key_file}\n"
                f"tls-ca-cert-file {self.tls.ca_file}\ntls-auth-clients no\n"
                "tls-replication yes\n"
            )
        (sentinel.workdir / "sentinel.conf").write_text(
            ports + "bind 127.0.0.1\n"
            f"dir {sentinel.workdir}\n"
            "logfile sentinel.log\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )

    def start(self) -> SentinelTopology:
        for node in self.data:
            node.spawn()
        for node in self.data:
            node.wait_ready()
        for sentinel in self.sentinels:
            self._write_sentinel_conf(sentinel)
            sentinel.spawn()
        for sentinel in self.sentinels:
            sentinel.wait_ready()
        self.wait_healthy()
        return self

    def primary_address(self, sentinel: Node | None = None) -> str:
        asked = sentinel or next(s for s in self.sentinels if s.alive)
        with asked.client() as client:
            host, port = client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", SERVICE)
        return f"{_text(host)}:{_text(port)}"

    def primary(self) -> Node:
        return next(n for n in self.data if n.address == self.primary_address())

    def healthy(self) -> bool:
        """One primary every Sentinel agrees on, replicas in sync, and every Sentinel
        knowing the others and the replicas (so a failover can get its quorum)."""
        addresses = {self.primary_address(s) for s in self.sentinels}
        if len(addresses) != 1:
            return False
        primary = next(n for n in self.data if n.address in addresses)
        if not primary.alive or primary.info("replication").get("role") != "master":
            return False
        for node in self.data:
            if node is primary or not node.alive:
                continue
            replication = node.info("replication")
            if replication.get("role") != "slave" or replication.get("master_link_status") != "up":
                return False
            if f"127.0.0.1:{replication.get('master_port')}" != primary.address:
                return False
        live_replicas = sum(1 for n in self.data if n.alive) - 1
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                others = client.execute_command("SENTINEL SENTINELS", SERVICE)
                replicas = client.execute_command("SENTINEL REPLICAS", SERVICE)
            if len(others) != len(self.sentinels) - 1:
                return False
            up = [r for r in replicas if "s_down" not in _flags(r)]
            if len(up) < live_replicas:
                return False
        return True

    def wait_healthy(self, within: float = 30.0) -> None:
        wait_for(self.healthy, within, "the Sentinel group to be healthy")

    def wait_failover(self, dead: Node, within: float = 30.0) -> Node:
        """Wait until every Sentinel names another primary, which answers as one."""

        def switched() -> bool:
            addresses = {self.primary_address(s) for s in self.sentinels}
            if len(addresses) != 1 or dead.address in addresses:
                return False
            node = next(n for n in self.data if n.address in addresses)
            return node.info("replication").get("role") == "master"

        wait_for(switched, within, f"the Sentinels to fail over from {dead.address}")
        return self.primary()

    def flush(self) -> None:
        with self.primary().client() as client:
            client.flushall()

    def stop(self) -> None:
        for node in (*self.sentinels, *self.data):
            node.kill()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flags(entry: Any) -> set[str]:
    """The flags of a ``SENTINEL REPLICAS`` entry (a flat list or a dict)."""
    if isinstance(entry, dict):
        pairs = {_text(k): _text(v) for k, v in entry.items()}
    else:
        items = [_text(x) for x in entry]
        pairs = dict(zip(items[::2], items[1::2], strict=False))
    return set(pairs.get("flags", "").split(","))


# -- context managers and fixtures --------------------------------------------------------


@contextlib.contextmanager
def cluster_topology(
    workdir: Path, *, tls: bool = False, failover_ms: int = FAILOVER_MS
) -> Iterator[ClusterTopology]:
    """A started Redis Cluster of this test's own, stopped afterwards."""
    topology = ClusterTopology(workdir, tls=tls, node_timeout_ms=failover_ms)
    try:
        yield topology.start()
    finally:
        topology.stop()


@contextlib.contextmanager
def sentinel_topology(
    workdir: Path, *, tls: bool = False, failover_ms: int = FAILOVER_MS
) -> Iterator[SentinelTopology]:
    """A started Sentinel group of this test's own, stopped afterwards."""
    topology = SentinelTopology(workdir, tls=tls, down_after_ms=failover_ms)
    try:
        yield topology.start()
    finally:
        topology.stop()


@pytest.fixture(scope="session", name="redis_cluster_session")
def _redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    workdir = tmp_path_factory.mktemp("redis-cluster")
    with cluster_topology(workdir, failover_ms=SESSION_FAILOVER_MS) as topology:
        yield topology


@pytest.fixture(scope="session", name="redis_sentinel_session")
def _redis_sentinel_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SentinelTopology]:
    workdir = tmp_path_factory.mktemp("redis-sentinel")
    with sentinel_topology(workdir, failover_ms=SESSION_FAILOVER_MS) as topology:
        yield topology


@pytest.fixture
def redis_cluster_uri(redis_cluster_session: ClusterTopology) -> str:
    """A shared Redis Cluster, healthy and emptied for each test."""
    redis_cluster_session.wait_healthy()
    redis_cluster_session.flush()
    return redis_cluster_session.uri


@pytest.fixture
def redis_sentinel_uri(redis_sentinel_session: SentinelTopology) -> str:
    """A shared Sentinel group, healthy and emptied for each test."""
    redis_sentinel_session.wait_healthy()
    redis_sentinel_session.flush()
    return redis_sentinel_session.uri
