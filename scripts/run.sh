#!/usr/bin/env bash
# The main job: set-up, then `radgate demo` (local Orthanc + the node + a synthetic CT, results back).
# With arguments they go to `radgate` instead: `scripts/run.sh serve --port 104` runs the node.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
    exec .venv/bin/radgate demo
fi
exec .venv/bin/radgate "$@"
