#!/usr/bin/env bash
# The two Quickstart commands, each doing its own set-up on a fresh clone:
#   ./run.sh tour [tour options]   the Gemma Scope 2 tour on a real Gemma 3 270M, on this CPU
#   ./run.sh test [pytest options] the whole test suite: the adapters' tests in ./.venv, then
#                                  tests/core in ./.venv-core, an environment without penzai,
#                                  treescope, flax or equinox, so the core is shown not to need
#                                  them (with pytest options: only those, in ./.venv)
# Both create ./.venv on first use (set DICTLEARN_VENV to use another folder).
set -euo pipefail
cd "$(dirname "$0")"
venv="${DICTLEARN_VENV:-.venv}"
what="${1:-}"; shift || true

setup() {  # $1: the extra to install, $2: the venv folder
  local at="${2:-$venv}"
  if [ ! -x "$at/bin/python" ]; then
    python3 -m venv "$at"
    "$at/bin/python" -m pip install -q --upgrade pip
  fi
  "$at/bin/python" -m pip install -q -e ".[$1]"
}

case "$what" in
  tour)
    setup demo
    exec "$venv/bin/dictlearn" tour "$@"
    ;;
  test)
    setup test
    # The tour-report test opens the HTML in headless Chromium (Debian's package).
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; the report rendering test will fail" >&2
    fi
    if [ $# -gt 0 ]; then  # Options given: run just those, in the full environment.
      exec "$venv/bin/python" -m pytest "$@"
    fi
    "$venv/bin/python" -m pytest --ignore=tests/core
    # The core where no neural-network framework is installed: it must not need one.
    core="${venv}-core"
    setup test-core "$core"
    "$core/bin/python" - <<'PY'
import importlib.util, sys
found = [m for m in ("penzai", "treescope", "flax", "equinox") if importlib.util.find_spec(m)]
sys.exit(f"the core test environment has {found} installed" if found else 0)
PY
    exec "$core/bin/python" -m pytest tests/core
    ;;
  *)
    echo "usage: ./run.sh tour [options] | ./run.sh test [pytest options]" >&2
    exit 2
    ;;
esac
