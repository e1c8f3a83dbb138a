#!/usr/bin/env bash
# Prepare, where a package index is reachable, the wheels that scripts/gpu-check.sh --python PY
# --wheels DIR installs on a GPU machine with no network (docs/gpu.md): what the GPU check needs
# that such a machine's Python lacks, at constraints.txt's versions for the target Python.
#
#   scripts/gpu-wheels.sh [--python-version X.Y] [--glibc 2.N] [--out DIR] [--all] [--have NAMES]
#
#   --python-version X.Y  the GPU machine's Python (default 3.12: cp312 wheels)
#   --glibc 2.N           the newest manylinux tag its glibc allows (default 2.28; x86-64 Linux)
#   --out DIR             where the wheels go (default: runs/gpu-wheels, git-ignored); the wheels
#                         already there are replaced, nothing else in DIR is touched
#   --all                 also trl, datasets and gguf with their dependencies (not needed by the check)
#   --have NAMES          comma-separated packages the GPU machine's Python already has; what they
#                         need is left out (default: torch,transformers,peft,accelerate,safetensors,
#                         scipy,triton,pyarrow,pytest,pip)
#   PYTHON                (environment) the interpreter whose pip downloads (default: python3)
#
# The GPU check imports bitsandbytes, liger-kernel and cut-cross-entropy (the loss part; pure Python, under
# 1 MiB together) beyond what such a machine holds; an offline editable install of qdora (pip install
# --no-index --no-build-isolation --no-deps -e .) also needs setuptools >= 77 and wheel. Those five are
# always fetched (bitsandbytes' manylinux wheel is ~41 MiB); --all adds
# the rest of the closure of trl, datasets and gguf that --have does not cover (dependencies read
# from constraints.txt's "via" lines). Each is fetched with `pip download --only-binary=:all:
# --no-deps` for the target (cp, its ABI, manylinux x86-64), pinned to the lock's version for that
# Python. It prints each wheel's size and the total, beside the 64 MiB a GPU machine may be sent.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
die() { echo "gpu-wheels: error: $1" >&2; exit "${2:-1}"; }  # message [exit status]

PYVER=3.12 GLIBC=2.28 OUT=runs/gpu-wheels ALL=0 HAVE=torch,transformers,peft,accelerate,safetensors,scipy,triton,pyarrow,pytest,pip
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER=${2:-}; shift ;;
    --python-version=*) PYVER=${1#*=} ;;
    --glibc) GLIBC=${2:-}; shift ;;
    --glibc=*) GLIBC=${1#*=} ;;
    --out) OUT=${2:-}; shift ;;
    --out=*) OUT=${1#*=} ;;
    --all) ALL=1 ;;
    --have) HAVE=${2:-}; shift ;;
    --have=*) HAVE=${1#*=} ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" 2 ;;
  esac
  shift
done
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || die "--python-version must be like 3.12, got '$PYVER'" 2
[[ "$GLIBC" =~ ^2\.[0-9]+$ ]] || die "--glibc must be like 2.28, got '$GLIBC'" 2
OUT=${OUT%/}
[ -n "$OUT" ] || die "--out needs a folder" 2
[ -f constraints.txt ] || die "constraints.txt is missing (scripts/lock.sh makes it)"
HOSTPY=${PYTHON:-python3}
"$HOSTPY" -m pip --version >/dev/null 2>&1 || die "no pip for '$HOSTPY' (set PYTHON to an interpreter with pip)"

ROOTS="bitsandbytes liger-kernel cut-cross-entropy setuptools wheel"
[ "$ALL" = 1 ] && ROOTS="$ROOTS trl datasets gguf"
# name==version for the target Python: the roots, then what they need beyond --have's closure.
REQS=$("$HOSTPY" - "$PYVER" "$ROOTS" "$HAVE" <<'EOF'
import re, sys
from pip._vendor.packaging.markers import Marker

pyver, roots, have = sys.argv[1], sys.argv[2].split(), [h.strip() for h in sys.argv[3].split(",") if h.strip()]
env = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix"}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
pins, deps, current = {}, {}, None   # deps[parent] = the packages whose "via" names parent
for line in open("constraints.txt"):
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s*(?:;\s*(.*))?$", line.rstrip())
    if m:
        name, version, marker = norm(m[1]), m[2], m[3]
        current = name if (not marker or Marker(marker).evaluate(env)) else None
        if current:
            pins[name] = version
        continue
    via = re.match(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)\s*$", line)
    if current and via and via[1] != "via":
        deps.setdefault(norm(via[1]), set()).add(current)

def closure(names):
    seen, todo = set(), [norm(n) for n in names]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(deps.get(n, ()))
    return seen

skip = closure(have)
wanted = [norm(r) for r in roots] + sorted(closure(roots) - skip - {norm(r) for r in roots})
for n in wanted:
    print(f"{n}=={pins[n]}" if n in pins else n)
EOF
) || die "could not read constraints.txt"

PLATFORMS=()
for minor in $(seq "${GLIBC#2.}" -1 17); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64)
TMP="$OUT.part.$$"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT" "$TMP" || die "cannot create $OUT"
echo "gpu-wheels: for cp${PYVER/./} (manylinux_${GLIBC/./_} x86-64): $(echo $REQS)"
# shellcheck disable=SC2086  # one argument per requirement
if ! "$HOSTPY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
     --implementation cp --abi "cp${PYVER/./}" "${PLATFORMS[@]}" -d "$TMP" $REQS; then
  die "pip download failed (is a package index reachable? the wheels in $OUT are left as they were)"
fi
rm -f "$OUT"/*.whl
mv "$TMP"/*.whl "$OUT"/ || die "could not move the wheels into $OUT"

mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }
total=0
for w in "$OUT"/*.whl; do
  b=$(stat -c %s "$w"); total=$((total + b))
  printf '  %8s MiB  %s\n' "$(mib "$b")" "${w##*/}"
done
repo=$(git ls-files -z 2>/dev/null | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
echo "gpu-wheels: $OUT: $(mib "$total") MiB in $(ls "$OUT"/*.whl | wc -l) wheels; with the repository's" \
     "tracked files ($(mib "$repo") MiB): $(mib $((total + repo))) MiB of the 64 MiB a GPU machine may be sent"
[ $((total + repo)) -lt $((60 * 1048576)) ] ||
  echo "gpu-wheels: warning: that leaves under 4 MiB of the 64 MiB (--all adds the most; leave it out)" >&2
echo "gpu-wheels: then, on the GPU machine: scripts/gpu-check.sh --python python3 --wheels $OUT"
