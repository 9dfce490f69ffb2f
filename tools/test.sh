#!/usr/bin/env bash
# README command 2: set up .venv/ if needed and run the whole test suite on CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest tests "$@"
