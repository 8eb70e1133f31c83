# Shared by serve.sh and test.sh: create .venv (installing python3-venv from apt
# when a fresh Debian lacks it) and offer apt installs when running as root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"

apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "wsguard: installing $* from apt" >&2
        apt-get update -qq >/dev/null || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "wsguard: please install $* (needs root and apt)" >&2
        return 1
    fi
}

ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        if ! "$PY" -m venv .venv >/dev/null 2>&1; then
            rm -rf .venv
            apt_install python3-venv
            "$PY" -m venv .venv
        fi
    fi
}
