#!/usr/bin/env bash
# Refresh constraints.txt, the tested version set, to today's newest releases within setup.cfg's
# ranges (torch stays at the CPU build on this machine's disk, 2.13.0), and run the suite on it.
# Usage: bash tools/refresh_pins.sh   (from the repository root; commit constraints.txt if green)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-pins
rm -rf $venv && python3 -m venv $venv
$venv/bin/python -m pip install --quiet --upgrade pip
$venv/bin/python -m pip install --quiet torch==2.13.0
$venv/bin/python -m pip install --quiet -e '.[test,lint]'
MLFLOW_DISABLE_TELEMETRY=true $venv/bin/python -m pytest -q
{ grep '^#' constraints.txt
  $venv/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$//'; } > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt refreshed; git diff constraints.txt shows what moved"
