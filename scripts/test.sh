#!/usr/bin/env bash
# The test command: set-up, then lint, type-check and the whole test suite (real Orthanc, DCMTK, validators)
# on several pytest-xdist workers: the tests mostly wait on subprocesses and sockets, so more workers than
# cores pay. RADGATE_TEST_WORKERS sets the count (0: one process); arguments go to pytest (e.g. tests/unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest -q -p no:cacheprovider -n "${RADGATE_TEST_WORKERS:-4}" "$@"
