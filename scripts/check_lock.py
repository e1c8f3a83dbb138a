"""Check that a lock (constraints.txt) matches what it was made from: every requirement declared in
pyproject.toml (dependencies and every extra) and in scripts/lock.in is pinned, and every pin lies
inside the declared range. One line per mismatch, exit status 1; `scripts/lock.sh` regenerates.

    python scripts/check_lock.py [constraints.txt]
    python scripts/check_lock.py --diff [constraints.txt]   # installed versions that differ from the lock
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare interpreter: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def declared() -> list[tuple[str, Requirement]]:
    """(where, requirement) for every requirement the lock is made from."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [("pyproject.toml dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        found += [(f"pyproject.toml extra {extra}", Requirement(r)) for r in reqs]
    for line in (ROOT / "scripts" / "lock.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            found.append(("scripts/lock.in", Requirement(line)))
    return found


def pin_lines(lock: Path) -> list[tuple[Requirement, str]]:
    """(requirement, pinned version) for each line of the lock, less those an override dropped
    (marker `sys_platform == 'never'`: never installed)."""
    found = []
    for number, line in enumerate(lock.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise SystemExit(f"{lock}:{number}: not a pin (name==version): {line}")
        if requirement.marker is None or "sys_platform == 'never'" not in str(requirement.marker):
            found.append((requirement, specs[0].version))
    return found


def pins(lock: Path) -> dict[str, list[str]]:
    """Each pinned name's versions (one per marker where they differ by Python)."""
    found: dict[str, list[str]] = {}
    for requirement, version in pin_lines(lock):
        found.setdefault(canonicalize_name(requirement.name), []).append(version)
    return found


def pins_here(lock: Path) -> dict[str, str]:
    """{name: version} of the pins whose markers hold for this interpreter."""
    return {canonicalize_name(r.name): version for r, version in pin_lines(lock)
            if r.marker is None or r.marker.evaluate()}


def differences(lock: Path) -> list[str]:
    """One line per installed distribution whose version is not the lock's pin for this interpreter."""
    pinned = pins_here(lock)
    out = []
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in pinned and not Requirement(f"{name}=={pinned[name]}").specifier.contains(dist.version, True):
            out.append(f"{name}: {pinned[name]} in {lock.name}, {dist.version} installed")
    return sorted(out)


def problems(lock: Path) -> list[str]:
    pinned = pins(lock)
    out = []
    for where, requirement in declared():
        name = canonicalize_name(requirement.name)
        if name not in pinned:
            out.append(f"{requirement.name} ({where}: {requirement}) is not pinned in {lock.name}")
            continue
        for version in pinned[name]:
            if not requirement.specifier.contains(version, prereleases=True):
                out.append(f"{lock.name} pins {requirement.name}=={version}, outside "
                           f"{requirement.name}{requirement.specifier} ({where})")
    return out


def main(argv: list[str]) -> int:
    diff = argv[:1] == ["--diff"]
    argv = argv[1:] if diff else argv
    lock = Path(argv[0]) if argv else ROOT / "constraints.txt"
    if not lock.is_file():
        print(f"check_lock: error: {lock} does not exist (scripts/lock.sh makes it)", file=sys.stderr)
        return 2
    if diff:  # what this interpreter has that the lock does not (scripts/canary.sh)
        found = differences(lock)
        print("\n".join(found) if found else f"every installed distribution pinned in {lock.name} has its version")
        return 0
    found = problems(lock)
    for line in found:
        print(f"check_lock: {line}", file=sys.stderr)
    if found:
        print(f"check_lock: {lock.name} does not match the declared ranges: regenerate it with scripts/lock.sh",
              file=sys.stderr)
        return 1
    print(f"check_lock: {lock.name} matches pyproject.toml and scripts/lock.in "
          f"({sum(len(v) for v in pins(lock).values())} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
