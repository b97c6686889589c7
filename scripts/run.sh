#!/usr/bin/env bash
# Sets up the host, then makes sure a verified golden image is built and current.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/master-controller image ensure
.venv/bin/master-controller doctor
