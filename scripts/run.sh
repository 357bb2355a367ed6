#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the main job: `slmquant run`. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SLMQUANT_DATA=${SLMQUANT_DATA:-$(cd .. && pwd)/shared/data}
.venv/bin/slmquant run "$@"
