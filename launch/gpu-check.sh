#!/usr/bin/env bash
# The accelerator check (cmd_ray/tools/gpu_check.py) on a machine with PyTorch and a GPU, no Ray and
# no network needed: bash launch/gpu-check.sh [--data-root DIR] [--output-json out.json]
# Needs numpy, pyarrow, pyyaml and filelock beside torch; the data root holds Fashion-MNIST's
# four IDX files under fashion-mnist/ (or the Parquet cache cmd-ray wrote there).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m cmd_ray.tools.gpu_check --device "${DEVICE:-cuda}" "$@"
