#!/usr/bin/env bash
# Regenerate constraints.txt, the tested set of packages setup.sh installs by default: qdora's declared
# dependencies with the dev extra (pyproject.toml) and scripts/lock.in, resolved by uv for Python 3.11
# and newer on every platform (one file; versions that differ by Python carry a marker).
#
#   scripts/lock.sh           regenerate: the newest versions the declared ranges allow
#   scripts/lock.sh --keep    add what a new dependency needs and keep every version the file already holds
#   scripts/lock.sh --check   say whether constraints.txt matches pyproject.toml's ranges (exit 1 if not)
#
# When: after changing a range in pyproject.toml, and to move the tested set forward once
# scripts/canary.sh has passed with the newest versions (docs/testing.md). Then run the tests
# (./setup.sh && .venv/bin/python -m pytest) and commit constraints.txt with what it changed.
# uv (UV_VERSION) comes from PATH or is installed once under ~/.cache/qdora.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PYTHON=${PYTHON:-python3}

UPGRADE=--upgrade
if [ "${1:-}" = --check ]; then
  exec "$PYTHON" scripts/check_lock.py constraints.txt
elif [ "${1:-}" = --keep ]; then
  UPGRADE=
elif [ -n "${1:-}" ]; then
  echo "lock.sh: error: unknown option $1 (use no option, or --check)" >&2; exit 2
fi

UV=uv
if ! { command -v uv >/dev/null 2>&1 && [ "$(uv --version | cut -d' ' -f2)" = "$UV_VERSION" ]; }; then
  tools="${QDORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qdora}/uv-$UV_VERSION"
  if [ ! -x "$tools/bin/uv" ]; then
    rm -rf "$tools"
    "$PYTHON" -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet "uv==$UV_VERSION"
  fi
  UV="$tools/bin/uv"
fi
tmp=$(mktemp constraints.txt.XXXXXX)
trap 'rm -f "$tmp"' EXIT
# --upgrade: the newest versions allowed, not the ones the current file holds. Without it (--keep) uv
# prefers the versions already in the output file, so the current lock is its starting point.
[ -n "$UPGRADE" ] || grep -v '^#' constraints.txt > "$tmp"
"$UV" pip compile pyproject.toml scripts/lock.in --extra dev --universal --python-version 3.11 \
  --overrides scripts/lock-overrides.txt $UPGRADE --quiet --no-header --output-file "$tmp"
{
  echo "# The tested set: what setup.sh installs by default (pip install -c constraints.txt)."
  echo "# Made by scripts/lock.sh with uv $UV_VERSION on $(date -u +%Y-%m-%d); do not edit by hand."
  echo "# Lines marked sys_platform == 'never' are dependencies that setup.sh does not install."
  cat "$tmp"
} > constraints.txt.new
mv constraints.txt.new constraints.txt
"$PYTHON" scripts/check_lock.py constraints.txt
