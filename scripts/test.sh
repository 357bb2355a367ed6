#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the default test tier. Extra arguments go to pytest.
# The mutation battery (marker `mutation`) is a tier of its own, left out here to keep this run under
# 30 minutes on two cores; CI adds it to the same session (.ci/run: `-m "not slow"`). A `-m` given
# here replaces the default.
# pytest exits 5 when it collects no test: that is a failure here too.
# Workers: SLMQUANT_WORKERS pytest-xdist processes (default 2; 0 runs in this process). Each gets
# max(1, cores // workers) torch threads (conftest.py): on two cores, two one-thread workers keep
# both cores busy where one process would leave one idle in GPTQ's single-threaded column loop. The
# gate's bands absorb the measured 1-vs-2-thread spread (docs/gate_bands.md).
# Tests of one cell share an xdist group (`--dist loadgroup`, pytest.ini): the worker that builds a
# cell runs all its tests, and no other worker sits waiting on the cell's build lock.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SLMQUANT_DATA=${SLMQUANT_DATA:-$(cd .. && pwd)/shared/data}
.venv/bin/python -m pytest -n "${SLMQUANT_WORKERS:-2}" -m "not mutation" "$@"
