#!/usr/bin/env bash
# The main job: set-up, then the node on its embedded defaults (arguments go to `radgate serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/radgate serve "$@"
