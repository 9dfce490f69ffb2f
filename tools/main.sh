#!/usr/bin/env bash
# README command 1: set up .venv/ if needed and run the main job on its embedded default.
# For now: the loss benchmark against Megatron's cross-entropy (CPU, a few minutes).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/python" examples/benchmark_loss.py "$@"
