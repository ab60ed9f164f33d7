#!/usr/bin/env bash
# The two Quickstart commands, each doing its own set-up on a fresh clone:
#   ./run.sh tour [tour options]   the Gemma Scope 2 tour on a real Gemma 3 270M, on this CPU
#   ./run.sh test [pytest options] the whole test suite
# Both create ./.venv on first use (set DICTLEARN_VENV to use another folder).
set -euo pipefail
cd "$(dirname "$0")"
venv="${DICTLEARN_VENV:-.venv}"
what="${1:-}"; shift || true

setup() {  # $1: the extra to install
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
  fi
  "$venv/bin/python" -m pip install -q -e ".[$1]"
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
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh tour [options] | ./run.sh test [pytest options]" >&2
    exit 2
    ;;
esac
