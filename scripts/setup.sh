#!/usr/bin/env bash
# Installs everything master-controller needs on a fresh Debian 12 host (run as root):
# Debian packages, and a virtualenv with the project and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    # images and the container runtime
    mmdebstrap debootstrap systemd-container e2fsprogs iproute2 nftables util-linux
    qemu-system-x86 qemu-utils
    dpkg coreutils ca-certificates python3 python3-venv
    # `deploy` fetches releases with git
    git
    # tests: a real browser for the viewer tests, a real PostgreSQL for the store tests,
    # real upstream proxies (HTTP CONNECT, SOCKS5) for the egress identity tests
    chromium fonts-dejavu-core postgresql tinyproxy dante-server
    # promtool checks and unit-tests the alert rules (deploy/prometheus)
    prometheus
    # the reverse proxy examples (docs/reverse-proxy/) run in front of a controller
    nginx caddy
)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(nodejs npm)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    # the tests run their own proxies (in namespaces, or on loopback ports of their own),
    # and need only promtool from prometheus; the packages' services stay off, and stay
    # off at boot on a host run by systemd
    for service in tinyproxy danted prometheus nginx caddy; do
        if [ -d /run/systemd/system ]; then
            systemctl disable --now "$service" >/dev/null 2>&1 || true
        elif command -v service >/dev/null 2>&1; then
            service "$service" stop >/dev/null 2>&1 || true
        fi
        pkill -x "$service" 2>/dev/null || true
    done
fi

# The noVNC client, from the npm registry (served by the controller, not kept in the repo).
if [ ! -f node_modules/@novnc/novnc/core/rfb.js ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "setup: installing npm packages"
    npm ci --no-audit --no-fund --loglevel=error
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    echo "setup: installing Python packages"
    .venv/bin/pip install -qq --upgrade pip
    .venv/bin/pip install -qq -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
