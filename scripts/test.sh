#!/usr/bin/env bash
# The test command: set-up, then lint, type-check and the whole test suite (real Orthanc, DCMTK, validators)
# on 4 pytest-xdist workers: the tests mostly wait on subprocesses and sockets, so twice as many workers as
# cores pays (bench/README.md, "tests"). Each worker takes whole modules (their fixtures are built once;
# tests/conftest.py), those with slow tests first. mypy runs beside the tests. RADGATE_TEST_WORKERS sets
# the count (0: one process); arguments go to pytest (e.g. tests/unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Python caches compiled modules unless PYTHONDONTWRITEBYTECODE is set (some machines set it): without the
# cache each of the hundreds of processes the tests start (nodes, receivers, workers) compiles radgate again.
unset PYTHONDONTWRITEBYTECODE
.venv/bin/python -m compileall -q plugin ai_models dicom_io tests >/dev/null
# The test processes (4 pytest workers, nodes, their job workers) outnumber the cores: torch's OpenMP
# threads would spin at every barrier waiting for a core that another process holds, which tripled the
# CPU of the pipeline tests (bench/README.md, "tests"). Passive waiting changes no result.
export OMP_WAIT_POLICY=PASSIVE
# Ray runs its workers (the Ray tests' actors, which import torch and run pipelines) at nice 15: beside
# the other tests' processes they got a sliver of the cores, and test_ray_executor took 127 s, not 20 s.
export RAY_worker_niceness=0
.venv/bin/ruff check .
mypy_log=$(mktemp)
# pytest writes its line counting the skipped real-data tests here (tests/support/testdata.py): it ends the output
skip_line=$(mktemp)
trap 'rm -f "$mypy_log" "$skip_line"' EXIT
.venv/bin/mypy >"$mypy_log" 2>&1 &
mypy_pid=$!
status=0
# set-up installed PostgreSQL: every store test runs on it as well as on SQLite, or fails (never skips)
export RADGATE_REQUIRE_POSTGRES=1
RADGATE_SKIP_LINE_FILE=$skip_line .venv/bin/pytest -q -p no:cacheprovider -n "${RADGATE_TEST_WORKERS:-4}" \
  --dist loadscope --no-loadscope-reorder "$@" || status=$?
mypy_status=0
wait "$mypy_pid" || mypy_status=$?
cat "$mypy_log"
if [ "$mypy_status" -ne 0 ]; then
  echo "test.sh: mypy failed" >&2
  status=1
fi
if [ -s "$skip_line" ]; then
  printf '\033[1;31m%s\033[0m\n' "$(cat "$skip_line")"
fi
exit "$status"
