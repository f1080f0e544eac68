#!/usr/bin/env bash
# The test command: set-up, then lint, type-check and the whole test suite (real Orthanc, DCMTK, validators).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
