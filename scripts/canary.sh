#!/usr/bin/env bash
# What comes next: build a throwaway environment with the newest versions pyproject.toml's ranges allow
# (QDORA_DEPS=latest ./setup.sh into it; torch stays the lock's CPU build, TORCH_SPEC to try another),
# run the lint and the test suite in it, and print which versions differ from the lock
# (constraints.txt) and what failed. Nothing in .venv or constraints.txt changes. docs/testing.md records each run.
#
#   scripts/canary.sh [--keep] [PYTEST ARGS...]
#
#   --keep   keep the throwaway environment (its path is printed) instead of removing it
#   PYTHON   interpreter for the environment (default: python3)
# Exit status: 0 if the lint and the tests passed with the newest versions, 1 if not, 2 if the
# environment could not be built. The full log is in runs/canary/<date>.log (git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
KEEP=0
if [ "${1:-}" = --keep ]; then KEEP=1; shift; fi
ENV=$(mktemp -d /tmp/qdora-canary.XXXXXX)
mkdir -p runs/canary
LOG=runs/canary/$(date -u +%Y-%m-%dT%H%M%SZ).log
cleanup() { [ "$KEEP" = 1 ] && echo "canary: environment kept in $ENV" || rm -rf "$ENV"; }
trap cleanup EXIT
say() { echo "canary: $*" | tee -a "$LOG"; }

TORCH=${TORCH_SPEC:-$(grep '^torch==' constraints.txt)}
say "$(date -u +%Y-%m-%d), $("$PYTHON" -V 2>&1), newest versions allowed by pyproject.toml, $TORCH; log: $LOG"
# setup.sh's own newest-versions install, into the throwaway environment
if ! QDORA_VENV="$ENV/venv" QDORA_DEPS=latest PYTHON="$PYTHON" ./setup.sh >> "$LOG" 2>&1; then
  say "error: could not build the environment (the end of $LOG says why)"
  tail -n 5 "$LOG" | sed 's/^/    /'
  exit 2
fi
say "versions that differ from constraints.txt:"
"$ENV/venv/bin/python" scripts/check_lock.py --diff constraints.txt | sed 's/^/    /' | tee -a "$LOG"

STATUS=0
if "$ENV/venv/bin/ruff" check . >> "$LOG" 2>&1; then
  say "lint: passed"
else
  say "lint: FAILED"; STATUS=1
fi
# The editable install in the throwaway environment points at this folder, as .venv's does; pytest's
# own cache is off so that the two do not mix.
"$ENV/venv/bin/python" -m pytest -q -p no:cacheprovider -rf "$@" > "$ENV/pytest.log" 2>&1
rc=$?
cat "$ENV/pytest.log" >> "$LOG"
grep -E '^(FAILED|ERROR) ' "$ENV/pytest.log" | sed 's/^/    /' | tee -a "$LOG"
summary=$(grep -E '(passed|failed|error)' "$ENV/pytest.log" | tail -n 1)
if [ "$rc" = 0 ]; then
  say "tests: passed ($summary)"
else
  say "tests: FAILED ($summary)"; STATUS=1
fi
[ "$STATUS" = 0 ] && say "the newest versions pass: scripts/lock.sh can move the lock to them" ||
  say "the newest versions break qdora: keep the lock, fix what failed (above), then scripts/lock.sh"
exit "$STATUS"
