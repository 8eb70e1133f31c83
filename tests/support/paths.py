"""Where things are: the checkout the tests run from and the ``wsguard`` command."""

from __future__ import annotations

import sys
from pathlib import Path

#: The root of the checkout (or worktree) these tests belong to.
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
README = REPO / "README.md"
#: The documentation site's pages (mkdocs.yml at the root builds them).
DOCS = REPO / "docs"
#: The ``wsguard`` console script beside the interpreter running the tests, so the suite
#: runs from any checkout or worktree (``PYTHONPATH`` picks the source it imports).
WSGUARD = str(Path(sys.executable).with_name("wsguard"))
