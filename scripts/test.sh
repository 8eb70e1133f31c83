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
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
# the Node.js target of the scanner's tests: its locked packages, again only when the lock
# changed (without node/npm those tests skip, saying so)
node_target=tests/targets/node_ws
if command -v npm >/dev/null 2>&1 && \
    ! cmp -s "$node_target/package-lock.json" "$node_target/node_modules/.wsguard-lock"; then
    (cd "$node_target" && timeout 300 npm ci --no-audit --no-fund --loglevel=error)
    cp "$node_target/package-lock.json" "$node_target/node_modules/.wsguard-lock"
fi
.venv/bin/ruff check src tests benchmarks examples docs
.venv/bin/ruff format --check src examples docs
.venv/bin/mypy
# the documentation site: a broken link, anchor or reference fails the build (not --quiet:
# it hides the warnings --strict counts)
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$site"
rm -rf "$site"
# 4 workers on 2 cores: the tests mostly wait on sockets, timers and subprocesses (the
# whole suite keeps ~30 % of two cores busy): ~6 min, against ~8-10 min with 2 workers
.venv/bin/pytest -q -p no:cacheprovider -n 4 "$@"
