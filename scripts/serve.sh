#!/usr/bin/env bash
# Install wsguard (the core, no extras: README, Install) into .venv and run `wsguard serve`
# (extra arguments are passed on).
source "$(dirname "$0")/_env.sh"
ensure_venv
.venv/bin/pip install -q --disable-pip-version-check .
exec .venv/bin/wsguard serve "$@"
