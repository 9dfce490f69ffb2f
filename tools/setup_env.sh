#!/usr/bin/env bash
# Creates .venv/ (Python 3.12) at the repository root and installs megatron-gem into it with
# the extras named in $MEGATRON_GEM_EXTRAS (default: test). Re-running is a no-op unless
# pyproject.toml, the constraints or this script changed. Source it or run it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extras="${MEGATRON_GEM_EXTRAS:-test}"

find_python312() {
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    command -v python3.12; return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    for p in "$(pyenv root)"/versions/3.12*/bin/python3.12; do
      [ -x "$p" ] && { echo "$p"; return; }
    done
  fi
  echo "megatron-gem needs Python 3.12 (megatron-core 0.17+ requires it); install it (e.g. 'pyenv install 3.12') and retry" >&2
  return 1
}

stamp_of() {
  cat "$root/pyproject.toml" "$root/tools/constraints.txt" "$root/tools/setup_env.sh" | sha256sum | cut -c1-16
  echo "$extras"
}

want="$(stamp_of)"
if [ -x "$venv/bin/python" ] && [ -f "$venv/.megatron-gem-stamp" ] && [ "$(cat "$venv/.megatron-gem-stamp")" = "$want" ]; then
  exit 0 2>/dev/null || return 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv (Python 3.12)" >&2
  "$(find_python312)" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v 'is ignored: it is neither' >&2 || true
fi
echo "[setup] installing megatron-gem[$extras] into $venv (first time: ~1-2 minutes, torch is large)" >&2
# pip.conf on some machines lists local index folders that may not exist: keep their warnings out.
"$venv/bin/python" -m pip install -q -c "$root/tools/constraints.txt" -e "$root[$extras]" 2>&1 \
  | { grep -v 'is ignored: it is neither' || true; } >&2
"$venv/bin/python" -c 'import megatron.core, megatron_gem' 
echo "$want" > "$venv/.megatron-gem-stamp"
