"""The host allocator of `qdora train`: jemalloc preloaded where the system has it (the command starts itself
again), the system's malloc on request or without it; the run log names the one it ran on."""

import os
import subprocess
import sys

import pytest
from test_loss_defaults import setup  # noqa: F401  (the same tiny model and data)

from qdora.train.allocator import DEFAULT_CONF, jemalloc_library, preload_env

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_preload_env_adds_jemalloc_once_and_keeps_what_was_set():
    assert preload_env({}, None) is None                                      # the system has none
    assert preload_env({"QDORA_ALLOCATOR": "system"}, "libjemalloc.so.2") is None
    env = preload_env({"PATH": "/bin"}, "libjemalloc.so.2")
    assert env == {"PATH": "/bin", "LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": DEFAULT_CONF}
    assert preload_env(env, "libjemalloc.so.2") is None                       # the restarted process goes on
    kept = preload_env({"LD_PRELOAD": "libfoo.so", "MALLOC_CONF": "narenas:2"}, "libjemalloc.so.2")
    assert kept["LD_PRELOAD"] == "libjemalloc.so.2 libfoo.so" and kept["MALLOC_CONF"] == "narenas:2"


@pytest.mark.parametrize("choice", ["default", "system"])
def test_the_run_log_names_the_allocator_the_command_ran_on(setup, tmp_path, choice):  # noqa: F811
    root, _ = setup
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "QDORA_ALLOCATOR")}
    if choice == "system":
        env["QDORA_ALLOCATOR"] = "system"
    # the console script's way in: `main()` with no arguments reads sys.argv
    code = "import sys; from qdora.cli import main; sys.exit(main())"
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", code, "train", "--model", str(root / "model"), "--data",
                           str(root / "data.json"), "--out", str(out), "--r", "4", "--max-steps", "1",
                           "--batch-size", "2", "--cutoff-len", "640", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = "jemalloc" if choice == "default" and jemalloc_library() else "system malloc"
    assert f"host allocator: {expected}" in (out / "run.log").read_text()
    assert f"host allocator: {expected}" in done.stdout
