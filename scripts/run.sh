#!/usr/bin/env bash
# Sets up the host, then runs the controller (it builds, verifies and promotes the golden
# image first if none is current). Settings: MC_* variables or /etc/master-controller/config.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/master-controller serve "$@"
