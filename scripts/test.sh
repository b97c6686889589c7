#!/usr/bin/env bash
# Sets up the host and runs the whole test suite (lint, types, unit, integration).
# Integration tests build the default image into their own data dir (cached across runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
