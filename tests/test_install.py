"""What a fresh machine installs: no repository folder shadows an installed distribution when Python
runs from the repository root, the lock (constraints.txt) matches the declared ranges, the wheel
holds the package and its data and no tests, and `qdora --help` imports nothing heavy."""

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "bitsandbytes", "peft")


def check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", REPO / "scripts" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def top_level_folders() -> list[str]:
    """The repository's tracked top-level folders whose names Python could import."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout:
        names = {line.split("/", 1)[0] for line in tracked.stdout.splitlines() if "/" in line}
    else:  # not a git checkout (an unpacked source archive)
        names = {p.name for p in REPO.iterdir() if p.is_dir()}
    return sorted(n for n in names if n.isidentifier() and (REPO / n).is_dir())


def import_from_root(names: list[str], extra_path: Path | None = None) -> dict[str, str]:
    """Import each name with the repository root first on sys.path (as `python -c` run there does):
    {name: the imported module's location, or the error}."""
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        m = importlib.import_module(name)\n"
        "        out[name] = getattr(m, '__file__', None) or ' '.join(getattr(m, '__path__', []))\n"
        "    except Exception as err:\n"
        "        out[name] = f'{type(err).__name__}: {err}'\n"
        "print(json.dumps(out))\n")
    env = dict(os.environ)
    if extra_path is not None:  # after the root, as an installed distribution's site folder is
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, env=env, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_no_top_level_folder_shadows_a_distribution_of_its_name(tmp_path):
    # Every top-level folder, against a made-up installed distribution of the same name: importing the
    # name from the repository root must give the distribution, never the folder.
    names = [n for n in top_level_folders() if n != "qdora"]  # qdora is the distribution itself
    assert {"kernels", "eval", "tests", "scripts"} <= set(names)
    site = tmp_path / "site"
    for name in names:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
        info = site / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        (info / "top_level.txt").write_text(f"{name}\n")
    found = import_from_root(names, extra_path=site)
    shadowed = {n: where for n, where in found.items() if not where.startswith(str(site / n))}
    assert not shadowed, f"repository folders shadow installed distributions: {shadowed}"


def test_no_top_level_folder_shadows_an_installed_distribution():
    # The distributions installed here (transformers 5.25 and later install `kernels`).
    provided = importlib.metadata.packages_distributions()
    names = [n for n in top_level_folders() if n in provided and n != "qdora"]
    found = import_from_root(names)
    shadowed = {n: where for n, where in found.items() if where.startswith(str(REPO / n))}
    assert not shadowed, f"repository folders shadow the installed {[provided[n] for n in shadowed]}: {shadowed}"


def test_a_folder_with_no_distribution_of_its_name_looks_like_an_empty_namespace():
    # No distribution provides `eval`: imported by that name, the folder is an empty module with no file,
    # no names and no submodules, which transformers before 5.25 (it imports a name it finds no metadata
    # for) and bitsandbytes take for "not installed".
    code = ("import importlib, json\n"
            "m = importlib.import_module('eval')\n"
            "names = sorted(n for n in vars(m) if not n.startswith('__'))\n"
            "try:\n"
            "    importlib.import_module('eval.common')\n"
            "    sub = 'imported'\n"
            "except ImportError:\n"
            "    sub = 'refused'\n"
            "print(json.dumps([getattr(m, '__file__', None), getattr(m, '__version__', None), list(m.__path__), "
            "names, sub]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [None, None, [], [], "refused"]


def test_the_issue_command_imports_the_real_kernels_beside_qdora():
    code = ("import kernels, qdora, peft, trl, transformers.modeling_utils\n"
            "import qdora.kernels, qdora.eval.common\n"
            "from qdora.kernels import NF4Weight\n"
            "print(getattr(kernels, '__file__', None))\n"
            "print(qdora.kernels.__file__)\n")
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI distribution `kernels` is not installed (transformers < 5.25)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    real, ours = out.stdout.split()
    assert not real.startswith(str(REPO / "kernels")), real
    assert ours == str(REPO / "kernels" / "__init__.py")


def test_qdora_help_and_version_import_nothing_heavy():
    code = ("import sys\n"
            "from qdora.cli import main\n"
            "for argv in (['--help'], ['--version'], []):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "COMMAND" in out.stdout and "qdora 0.1.0" in out.stdout
    assert out.stdout.splitlines()[-1] == "[]", out.stdout


def test_public_names_resolve_lazily():
    import qdora
    assert set(qdora.__all__) <= set(dir(qdora))
    for name in qdora.__all__:
        assert getattr(qdora, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qdora.nope  # noqa: B018


# ---- the lock --------------------------------------------------------------------------------------

def test_the_lock_matches_the_declared_ranges():
    assert check_lock().problems(REPO / "constraints.txt") == []


def test_a_lock_outside_the_declared_ranges_is_named(tmp_path):
    lock = tmp_path / "constraints.txt"
    text = (REPO / "constraints.txt").read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith(("transformers==", "gguf=="))]
    lock.write_text("\n".join(lines + ["transformers==4.0.0"]) + "\n")
    found = check_lock().problems(lock)
    assert any("pins transformers==4.0.0, outside transformers>=" in p for p in found)
    assert any(p.startswith("gguf (pyproject.toml extra dev") and "is not pinned" in p for p in found), found
    status = subprocess.run([sys.executable, str(REPO / "scripts" / "check_lock.py"), str(lock)],
                            capture_output=True, text=True)
    assert status.returncode == 1 and "regenerate it with scripts/lock.sh" in status.stderr


def test_the_declared_peft_range_is_the_one_patch_peft_accepts():
    import tomllib

    from qdora.integrations.peft import PEFT_VERSIONS
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    first, last = PEFT_VERSIONS
    for extra in ("dev", "peft"):
        assert f"peft>={first},<{last}" in project["optional-dependencies"][extra], extra


def test_the_installed_set_is_the_lock_where_setup_used_it():
    # setup.sh's default (QDORA_DEPS=locked) installs constraints.txt's versions; CI runs with it.
    stamp = Path(sys.prefix) / "qdora-setup.done"
    if not stamp.is_file() or not stamp.read_text().startswith("deps=locked"):
        pytest.skip("not an environment setup.sh made from the lock")
    differ = check_lock().differences(REPO / "constraints.txt")
    assert not differ, differ


# ---- the wheel -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_wheel_holds_the_package_and_data_and_no_tests(tmp_path):
    pytest.importorskip("build")
    source = tmp_path / "src"  # a clean copy: what a fresh clone holds
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    for name in tracked.stdout.splitlines():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("qdora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("qdora/__init__.py", "qdora/cli.py", "qdora/kernels/__init__.py",
                   "qdora/kernels/ops.py", "qdora/kernels/triton_kernels.py", "qdora/eval/__init__.py",
                   "qdora/eval/harness/runner.py", "qdora/demo_data/arc_easy_train.json"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "kernels/", "eval/", "scripts/", "docs/"))], names
    assert not [n for n in names if "conftest" in n or "/test_" in n]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: transformers" in metadata
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "qdora = qdora.cli:main" in entry_points


# ---- setup.sh's bad input: one line, nothing made --------------------------------------------------

def setup_copy(tmp_path: Path) -> Path:
    """setup.sh and the lock in a folder of their own (setup.sh works in its own folder)."""
    folder = tmp_path / "clone"
    folder.mkdir()
    for name in ("setup.sh", "constraints.txt"):
        shutil.copy2(REPO / name, folder / name)
    return folder


def run_setup(folder: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(folder / "setup.sh")], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def test_setup_refuses_an_old_python_in_one_line(tmp_path):
    folder = setup_copy(tmp_path)
    old = tmp_path / "python3.10"  # answers like a Python 3.10 would
    old.write_text('#!/bin/sh\nif [ "$1" = -V ]; then echo "Python 3.10.13"; exit 0; fi\nexit 1\n')
    old.chmod(0o755)
    result = run_setup(folder, PYTHON=str(old))
    assert result.returncode == 1
    assert result.stderr.strip() == ("setup.sh: error: Python 3.10.13 is too old: qdora needs Python >= 3.11 "
                                     "(set PYTHON=python3.12, say)")
    assert not (folder / ".venv").exists()
    result = run_setup(folder, PYTHON=str(tmp_path / "nope"))
    assert result.returncode == 1 and "no interpreter" in result.stderr and len(result.stderr.splitlines()) == 1


def test_setup_with_no_index_reachable_says_so_and_makes_nothing(tmp_path):
    folder = setup_copy(tmp_path)
    unreachable = "http://127.0.0.1:9/simple"  # the discard port: nothing listens
    result = run_setup(folder, PIP_INDEX_URL=unreachable)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"setup.sh: error: no package index reachable at {unreachable} (set "
                                     "PIP_INDEX_URL, or run where PyPI is reachable); nothing changed")
    assert not (folder / ".venv").exists()
    # A .venv a finished run made from this very lock is left as it is.
    lock = hashlib.sha256((folder / "constraints.txt").read_bytes()).hexdigest()[:16]
    (folder / ".venv").mkdir()
    (folder / ".venv" / "qdora-setup.done").write_text(f"deps=locked lock={lock} torch=locked\n")
    result = run_setup(folder, PIP_INDEX_URL=unreachable)
    assert result.returncode == 0 and "left as it is" in result.stdout, result.stderr
    # A half-made one (no record of a finished run) is not mistaken for a good one.
    (folder / ".venv" / "qdora-setup.done").unlink()
    result = run_setup(folder, PIP_INDEX_URL=unreachable)
    assert result.returncode == 1 and "no package index reachable" in result.stderr


def test_setup_rejects_an_unknown_deps_mode(tmp_path):
    result = run_setup(setup_copy(tmp_path), QDORA_DEPS="newest")
    assert result.returncode == 1
    assert result.stderr.strip() == "setup.sh: error: QDORA_DEPS must be locked or latest, got 'newest'"
