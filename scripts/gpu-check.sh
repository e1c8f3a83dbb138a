#!/usr/bin/env bash
# One command that checks every GPU path of qdora (docs/gpu.md): the GPU tests, `qdora bench kernels`,
# `qdora bench layer`, `qdora plan` against a measured training step of a synthetic
# Llama-3-8B-shaped model, and the longest sequence such a model trains at beside the plan's;
# every figure goes to OUT/report.json and OUT/report.md.
#
#   scripts/gpu-check.sh [--quick] [--device cpu] [--out DIR] [--keep-going] [--only PARTS]
#                        [--budget-scale X] [--no-setup] [--python PY [--wheels DIR]]
#
#   --quick          ~4 minutes instead of ~9 (fewer shapes and layers, no slow tests)
#   --device cpu     dry run: the same parts at tiny shapes on the CPU (no GPU needed)
#   --out DIR        where the report, parts and logs go (default: runs/gpu-check, git-ignored)
#   --keep-going     run every part even after one fails (default: stop at the first failure)
#   --only PARTS     comma-separated subset of: env, tests, bench-kernels, bench-layer, loss, step, long
#   --budget-scale X multiply every part's time budget by X (default 1)
#   --no-setup       never run ./setup.sh (use .venv as it is)
#   --python PY      offline, no .venv, no setup.sh: use PY's own torch (and whatever else PY has)
#                    through a virtual environment runs/gpu-venv made with --system-site-packages
#                    (PY itself is not changed); what PY lacks comes from --wheels
#   --wheels DIR     the wheels made by scripts/gpu-wheels.sh where an index is reachable
#                    (default: runs/gpu-wheels); installed with pip --no-index, only what is missing
#                    (relative paths, here as for --out, are taken from the repository's root)
#
# Without an NVIDIA GPU (and without --device cpu) it says so in one line and exits 0. With one,
# it uses .venv if its torch sees the GPU, else creates it with ./setup.sh (TORCH_SPEC, default
# torch==2.13.0 from PyPI, a CUDA build on Linux; the setup is outside the parts' budgets). With
# --python it needs no network: runs/gpu-venv gets, from DIR, only the packages PY lacks or has too
# old (pip install --no-index --find-links DIR), then qdora itself (pip install --no-index
# --no-build-isolation --no-deps -e .). Each part runs in its own process group under `timeout` with
# its budget; on exit (normal, error, Ctrl-C or SIGTERM) every process a part started is ended,
# found by a tag in its environment.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

MODE=full DEVICE=cuda OUT=runs/gpu-check KEEP=0 ONLY="" SCALE=1 SETUP=1 BASEPY="" WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --device) DEVICE=${2:-}; shift ;;
    --device=*) DEVICE=${1#*=} ;;
    --out) OUT=${2:-}; shift ;;
    --out=*) OUT=${1#*=} ;;
    --keep-going) KEEP=1 ;;
    --only) ONLY=${2:-}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    --budget-scale) SCALE=${2:-}; shift ;;
    --budget-scale=*) SCALE=${1#*=} ;;
    --no-setup) SETUP=0 ;;
    --python) BASEPY=${2:-}; shift ;;
    --python=*) BASEPY=${1#*=} ;;
    --wheels) WHEELS=${2:-}; shift ;;
    --wheels=*) WHEELS=${1#*=} ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu-check: error: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
if [ -z "$OUT" ]; then echo "gpu-check: error: --out needs a folder" >&2; exit 2; fi
if [ -n "$WHEELS" ] && [ -z "$BASEPY" ]; then echo "gpu-check: error: --wheels goes with --python PY" >&2; exit 2; fi

if [ "$DEVICE" = cuda ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi lists none): nothing run; use --device cpu for a dry run"
  exit 0
fi

torch_ok() {  # the interpreter's torch imports (and, for cuda, sees the GPU)
  [ -x "$PY" ] && "$PY" -c "import sys, torch; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 1)" \
    >/dev/null 2>&1
}
fail() { echo "gpu-check: error: $*" >&2; exit 1; }

needs() {  # what the check needs beyond the standard library, read from pyproject.toml by interpreter $1:
  # the dependencies, the dev extra's pytest, peft and triton, and the build requirements of qdora's
  # offline editable install
  "$1" - <<'EOF'
import re
import tomllib
with open("pyproject.toml", "rb") as f:
    data = tomllib.load(f)
dev = [r for r in data["project"]["optional-dependencies"]["dev"]
       if re.match(r"[A-Za-z0-9._-]+", r).group() in ("pytest", "peft", "triton", "liger-kernel", "cut-cross-entropy")]
print("\n".join(data["project"]["dependencies"] + dev + data["build-system"]["requires"]))
EOF
}
offline_env() {  # --python: runs/gpu-venv over PY's packages, with what PY lacks installed from WHEELS
  local root=$PWD base venv=$PWD/runs/gpu-venv want missing nowheel=() install=() kind spec state
  base=$(command -v "$BASEPY") || fail "no interpreter '$BASEPY' (--python takes a path or a command name)"
  "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    fail "$("$base" -V 2>&1) is too old: qdora needs Python >= 3.11"
  "$base" -c 'import torch' >/dev/null 2>&1 ||
    fail "$BASEPY has no torch: --python needs an interpreter with torch (on a GPU machine, a CUDA build)"
  if [ "$DEVICE" = cuda ] && ! "$base" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; then
    fail "$BASEPY's torch $("$base" -c 'import torch; print(torch.__version__)') cannot use the GPU"
  fi
  WHEELS=${WHEELS:-runs/gpu-wheels}
  want=$("$base" -c 'import sys; print(sys.executable, sys.version.split()[0])')
  if [ "$(cat "$venv/qdora-base" 2>/dev/null)" != "$want" ]; then  # made from another interpreter, or half-made
    rm -rf "$venv"
    echo "gpu-check: making runs/gpu-venv from $BASEPY (Python ${want##* }) with --system-site-packages; not counted in the budgets"
    if ! "$base" -m venv --system-site-packages "$venv" >/dev/null 2>&1; then  # no ensurepip: PY's own pip, if any
      rm -rf "$venv"
      "$base" -m venv --system-site-packages --without-pip "$venv" || fail "$BASEPY -m venv could not make $venv"
    fi
    # PY may itself be a virtual environment, whose packages --system-site-packages does not reach
    # (it reaches its base interpreter's): then a .pth file adds PY's site-packages after runs/gpu-venv's.
    "$base" - "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" <<'EOF' ||
import site, sys
if sys.prefix != sys.base_prefix:
    dirs = [d for d in site.getsitepackages() if d.startswith(sys.prefix)]
    with open(sys.argv[1] + "/qdora-gpu-check-base.pth", "w") as f:
        f.writelines(f"import site; site.addsitedir({d!r})\n" for d in dirs)
EOF
      fail "could not make $BASEPY's packages visible in $venv"
    "$venv/bin/python" -m pip --version >/dev/null 2>&1 ||
      fail "$venv has no pip: $BASEPY has neither ensurepip (Debian: python3-venv) nor pip"
    echo "$want" > "$venv/qdora-base"
  fi
  PY=$venv/bin/python
  local needed
  needed=$(needs "$base" 2>&1) || fail "$BASEPY: $needed"
  mapfile -t NEEDS <<< "$needed"
  missing=$("$PY" - "$WHEELS" "${NEEDS[@]}" <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()  # noqa: E731
folder = Path(sys.argv[1])
wheels = {norm(w.name.split("-")[0]) for w in folder.glob("*.whl")} if folder.is_dir() else set()
for spec in sys.argv[2:]:
    req = Requirement(spec)
    if req.marker and not req.marker.evaluate():
        continue
    try:
        have = version(req.name)
        if req.specifier.contains(have, prereleases=True):
            continue
        state = f"has {have}"
    except PackageNotFoundError:
        state = "not installed"
    print("install" if norm(req.name) in wheels else "nowheel", f"{req.name}{req.specifier}", state, sep="\t")
EOF
) || fail "could not list what $BASEPY lacks"
  while IFS=$'\t' read -r kind spec state; do
    [ -z "$kind" ] && continue
    if [ "$kind" = install ]; then install+=("$spec"); else nowheel+=("$spec ($state)"); fi
  done <<< "$missing"
  if [ ${#nowheel[@]} -gt 0 ]; then
    local list it=it
    list=$(printf '%s, ' "${nowheel[@]}")
    [ ${#nowheel[@]} -gt 1 ] && it=them
    fail "$BASEPY lacks ${list%, }, and $WHEELS has no wheel for $it: make $WHEELS with" \
         "scripts/gpu-wheels.sh where a package index is reachable, and bring it along"
  fi
  if [ ${#install[@]} -gt 0 ]; then
    echo "gpu-check: installing into runs/gpu-venv from $WHEELS, no index: ${install[*]}"
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "${install[@]}" ||
      fail "pip could not install ${install[*]} from $WHEELS (no index)"
  fi
  # qdora from this checkout (run from / so that the working directory does not stand in for it)
  if ! (cd / && "$PY" -c 'import os, sys, qdora.eval; sys.exit(os.path.realpath(qdora.__file__) != os.path.realpath(sys.argv[1]))' "$root/qdora/__init__.py") \
       >/dev/null 2>&1; then
    echo "gpu-check: installing qdora into runs/gpu-venv (editable, no index, no build isolation, no dependencies)"
    PYTHONWARNINGS="ignore:Editable installation" "$PY" -m pip install --quiet --no-index --no-build-isolation \
      --no-deps -e . || fail "pip could not install qdora (pip install --no-index --no-build-isolation --no-deps -e .)"
  fi
}

if [ -n "$BASEPY" ]; then
  offline_env
  torch_ok || fail "runs/gpu-venv's torch cannot use the $DEVICE device"
  "$PY" -c 'import qdora, bitsandbytes' >/dev/null 2>&1 || fail "runs/gpu-venv cannot import qdora and bitsandbytes"
else  # .venv, made by ./setup.sh if need be
  PY=.venv/bin/python
  if ! torch_ok; then
    if [ -x "$PY" ] && "$PY" -c "import torch" >/dev/null 2>&1; then
      echo "gpu-check: error: .venv's torch $("$PY" -c 'import torch; print(torch.__version__)') cannot use the GPU;" \
           "move .venv aside and run again (setup.sh then installs TORCH_SPEC, default torch==2.13.0)" >&2
      exit 1
    fi
    if [ "$SETUP" = 0 ]; then echo "gpu-check: error: no usable .venv and --no-setup given" >&2; exit 1; fi
    echo "gpu-check: setting up .venv (./setup.sh, TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}); not counted in the budgets"
    if ! TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0} timeout 1800 ./setup.sh; then
      echo "gpu-check: error: ./setup.sh failed" >&2; exit 1
    fi
    torch_ok || { echo "gpu-check: error: after setup, torch still cannot use the $DEVICE device" >&2; exit 1; }
  fi
fi

mkdir -p "$OUT/logs" "$OUT/parts" || exit 1
rm -f "$OUT"/parts/* "$OUT"/logs/* "$OUT/status.jsonl" "$OUT/report.json" "$OUT/report.md"
TAG="gpu-check-$$-$(date +%s%N)"
PLAN=$("$PY" -m qdora.eval.gpu.check parts --mode "$MODE" --device "$DEVICE" --out "$OUT" --only "$ONLY" \
       --budget-scale "$SCALE") || { echo "gpu-check: error: could not list the parts" >&2; exit 2; }
NAMES=$(printf '%s\n' "$PLAN" | cut -f1 | paste -sd, -)
printf '{"mode": "%s", "device": "%s", "started": "%s", "parts": ["%s"]}\n' "$MODE" "$DEVICE" \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${NAMES//,/\", \"}" > "$OUT/meta.json"

tagged() {  # pids of every live process started by a part (they carry the tag in their environment)
  local d
  for d in /proc/[0-9]*; do
    [ -O "$d" ] || continue  # this user's processes only
    if { tr '\0' '\n' < "$d/environ"; } 2>/dev/null | grep -qx "QDORA_GPU_CHECK_TAG=$TAG"; then echo "${d#/proc/}"; fi
  done
}
end_tagged() {  # TERM, then KILL, whatever a part left running
  local pids
  pids=$(tagged)
  [ -z "$pids" ] && return 0
  kill -TERM $pids 2>/dev/null
  sleep 2
  pids=$(tagged)
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  echo "gpu-check: ended $(echo $pids | wc -w) leftover process(es) of a part" >&2
}
CURRENT=""
cleanup() {
  if [ -n "$CURRENT" ]; then kill -TERM -- "-$CURRENT" 2>/dev/null; fi
  end_tagged
}
trap 'cleanup' EXIT
trap 'echo "gpu-check: interrupted" >&2; exit 130' INT TERM

STOPPED=""
while IFS=$'\t' read -r name budget cmd; do
  log="$OUT/logs/$name.log"
  echo "gpu-check: $name (budget ${budget} s) ..."
  start=$(date +%s%N)
  QDORA_GPU_CHECK_TAG=$TAG setsid --wait timeout --kill-after=10 "$budget" bash -c "$cmd" > "$log" 2>&1 &
  CURRENT=$!
  wait "$CURRENT"
  rc=$?
  CURRENT=""
  end_tagged
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  secs="$((ms / 1000)).$(( (ms % 1000) / 100 ))"
  printf '{"part": "%s", "rc": %d, "seconds": %s, "budget_s": %s, "log": "%s"}\n' \
    "$name" "$rc" "$secs" "$budget" "$log" >> "$OUT/status.jsonl"
  if [ "$rc" = 0 ]; then
    printf 'gpu-check: %s: ok (%s s)\n' "$name" "$secs"
  else
    what="failed (exit status $rc)"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && what="ran past its ${budget} s budget"
    printf 'gpu-check: %s: %s; log: %s\n' "$name" "$what" "$log"
    tail -n 5 "$log" | sed 's/^/    /'
    if [ "$KEEP" = 0 ]; then STOPPED=$name; break; fi
  fi
done <<< "$PLAN"
[ -n "$STOPPED" ] && echo "gpu-check: stopped at $STOPPED (--keep-going runs the remaining parts anyway)"

"$PY" -m qdora.eval.gpu.check report --out "$OUT"
