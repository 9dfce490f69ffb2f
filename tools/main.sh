#!/usr/bin/env bash
# README command 1: set up .venv/ if needed and run the main job: a CE-vs-GEM study on the
# embedded synthetic world (pre-train a tiny GPT on CPUs, SFT it with CE and with GEM at two
# betas, evaluate every saved checkpoint, write report.md, results.csv and PNG plots).
# Output folder: $STUDY_OUT (default outputs/study-default); rerunning resumes (a finished study
# only prints where its report is). Extra arguments go to `python -m megatron_gem.study run`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
out="${STUDY_OUT:-outputs/study-default}"
exec "$root/.venv/bin/python" -m megatron_gem.study run --out "$out" "$@"
