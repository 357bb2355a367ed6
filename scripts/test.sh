#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the default test tier. Extra arguments go to pytest.
# pytest exits 5 when it collects no test: that is a failure here too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SLMQUANT_DATA=${SLMQUANT_DATA:-$(cd .. && pwd)/shared/data}
.venv/bin/python -m pytest "$@"
