#!/usr/bin/env bash
# Install everything the tests need and run the whole suite: lint, types, the
# documentation build, tests.
# This is exactly what CI runs (.ci/run). Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
ensure_venv
# pinned (constraints.txt): a new release on PyPI cannot turn CI red overnight
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
.venv/bin/ruff check src tests benchmarks examples docs
.venv/bin/ruff format --check src examples docs
.venv/bin/mypy
# the documentation site: a broken link, anchor or reference fails the build (not --quiet:
# it hides the warnings --strict counts)
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$site"
rm -rf "$site"
# 2 workers (one per core): the tests mostly wait on sockets and timers (8.7 min in one process)
.venv/bin/pytest -q -p no:cacheprovider -n 2 "$@"
