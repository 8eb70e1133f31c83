"""The C load generator (``benchmarks/cloadgen/loadgen.c``) behind loadgen.py's protocol.

bench.py runs this script in place of ``benchmarks/loadgen.py`` for the phases the C program
implements (``pingpong``, ``oneway``, ``handshake``) when given ``--client c``. It reads the
same configuration line on stdin, builds the C program on first use (into the git-ignored
``benchmarks/cloadgen/build/``, again whenever the source is newer), and replaces itself
with it: the C program then answers ``ready``, reads ``go`` and writes the ``result`` line
itself, so the process bench.py measures is the C program alone.

    python benchmarks/cloadgen.py --build    # build (if needed) and print the binary's path
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "cloadgen" / "loadgen.c"
BUILD = HERE / "cloadgen" / "build"
BINARY = BUILD / "loadgen"
CFLAGS = ("-std=c11", "-O2", "-Wall", "-Wextra", "-Werror")
PHASES = ("pingpong", "oneway", "handshake")


class BuildError(RuntimeError):
    """No C compiler, or the build failed."""


def compiler() -> list[str] | None:
    """``$CC``, else the first of cc, gcc, clang on the PATH."""
    if os.environ.get("CC"):
        cmd = shlex.split(os.environ["CC"])
        return cmd if cmd and shutil.which(cmd[0]) else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found is not None:
            return [found]
    return None


def build() -> Path:
    """The C load generator, compiled when missing or older than its source."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    cc = compiler()
    if cc is None:
        raise BuildError(
            f"no C compiler to build {SOURCE.relative_to(HERE.parent)} "
            "(install cc, gcc or clang, or set CC; or choose another --client)"
        )
    BUILD.mkdir(parents=True, exist_ok=True)
    partial = BUILD / f"loadgen.{os.getpid()}.tmp"  # several load generators may build at once
    done = subprocess.run(
        [*cc, *CFLAGS, "-o", str(partial), str(SOURCE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"{' '.join(cc)} failed on {SOURCE}:\n{done.stderr}")
    os.replace(partial, BINARY)
    return BINARY


def read_config() -> dict[str, Any]:
    """The configuration line, read from fd 0 without reading past it (the C program reads
    the rest of stdin)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        data += chunk
    if data.count(b"\n") > 1:
        raise SystemExit("cloadgen: more than the configuration line before ready")
    config: dict[str, Any] = json.loads(data)
    return config


def arguments(cfg: dict[str, Any], tokens: str) -> list[str]:
    """The C program's command line for loadgen.py's configuration *cfg*."""
    return [
        "--phase", cfg["phase"],
        "--host", cfg["host"],
        "--port", str(cfg["port"]),
        "--origin", cfg["origin"],
        "--tokens", tokens,
        "--conns", str(cfg["conns"]),
        "--msg-bytes", str(cfg["msg_bytes"]),
        "--depth", str(cfg["depth"]),
        "--timeout", str(cfg["timeout"]),
        "--index", str(cfg.get("index", 0)),
        "--spread", "1" if cfg.get("spread") else "0",
        "--max-seconds", str(cfg.get("max_seconds", 600)),
    ]  # fmt: skip


def main() -> None:
    if sys.argv[1:] == ["--build"]:
        try:
            print(build())
        except BuildError as exc:
            raise SystemExit(str(exc)) from None
        return
    cfg = read_config()
    if cfg["phase"] not in PHASES:
        raise SystemExit(
            f"cloadgen: phase {cfg['phase']!r} is not implemented in C "
            f"({', '.join(PHASES)} are); use benchmarks/loadgen.py"
        )
    try:
        binary = build()
    except BuildError as exc:
        raise SystemExit(f"cloadgen: {exc}") from None
    # the tokens (thousands of JWTs) through an unlinked file, not the command line
    with tempfile.TemporaryFile() as tokens:
        tokens.write("\n".join(cfg["tokens"]).encode() + b"\n")
        tokens.flush()
        fd = tokens.fileno()
        os.set_inheritable(fd, True)
        os.execv(binary, [str(binary), *arguments(cfg, f"/dev/fd/{fd}")])


if __name__ == "__main__":
    main()
