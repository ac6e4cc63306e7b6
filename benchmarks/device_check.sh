#!/usr/bin/env bash
# The GPU device check (issue 12 §6): extract vs encode_image (bf16/fp16), cached vs online training step with peak
# GPU memory, cache reader (8 workers) vs the step's consumption, Grad-CAM on the GPU vs the CPU. One JSON file.
#
#   benchmarks/device_check.sh [--out benchmarks/results/device_check.json]   # GPU machine, under 8 minutes
#   benchmarks/device_check.sh --smoke --out /tmp/device_check_smoke.json     # CPU, tiny model, well under a minute
#
# Uses .venv/bin/python when the checkout has one, else $PYTHON or python3; stops after $DEVICE_CHECK_LIMIT seconds
# (default 480). Other options: benchmarks/device_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
exec timeout "${DEVICE_CHECK_LIMIT:-480}" "$PYTHON" benchmarks/device_check.py "$@"
