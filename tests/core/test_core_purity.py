"""The policy core performs no I/O: it imports no event loop, server, socket or Redis library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import wsguard.core

CORE = Path(wsguard.core.__file__).parent
FORBIDDEN = (
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "select",
    "http.client",
    "urllib.request",
    "websockets",
    "redis",
    "limits",
    "uvloop",
    "picows",
    "uvicorn",
    "threading",
    "subprocess",
)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _is_forbidden(module: str) -> bool:
    return any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN)


def test_core_modules_import_no_io_library() -> None:
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) >= 8
    offenders = {
        path.name: sorted(m for m in _imports(path) if _is_forbidden(m)) for path in modules
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_core_imports_only_core_config_errors_and_store_interface() -> None:
    allowed_internal = (
        "wsguard.core",
        "wsguard.config.model",
        "wsguard.config.demo_types",
        "wsguard.errors",
        "wsguard.stores.base",
    )
    for path in CORE.glob("*.py"):
        for module in _imports(path):
            if module.startswith("wsguard"):
                assert module.startswith(allowed_internal), f"{path.name} imports {module}"


def test_importing_the_core_loads_no_event_loop_server_or_redis() -> None:
    code = (
        "import sys\n"
        "import wsguard.core.handshake, wsguard.core.messages, wsguard.core.auth\n"
        "bad = ('asyncio', 'websockets', 'redis', 'limits', 'uvloop', 'picows', 'uvicorn')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in bad}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_the_detector_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import asyncio\nfrom redis.asyncio import Redis\nimport json\n")
    assert sorted(m for m in _imports(sample) if _is_forbidden(m)) == ["asyncio", "redis.asyncio"]
