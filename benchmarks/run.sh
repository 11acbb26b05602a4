#!/usr/bin/env bash
# Regenerate the benchmark reports with the default settings (see benchmarks/README.md).
# Usage: benchmarks/run.sh [BUNDLE] [OUT]   (defaults: Resources/Models/default, docs/benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-Resources/Models/default}
OUT=${2:-docs/benchmarks}
PYTHON=${PYTHON:-python}
"$PYTHON" -m TibiaReconstructionLib.cli bench accuracy --bundle "$BUNDLE" --out "$OUT" --overwrite
"$PYTHON" -m TibiaReconstructionLib.cli bench speed --bundle "$BUNDLE" --training --out "$OUT" --overwrite
