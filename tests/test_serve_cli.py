"""`qdora chat` and `qdora serve` as a user runs them: answers equal `model.generate` in-process, bad input
refused in one line before the server starts, SIGTERM finishing the request that runs."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from serving import PROMPTS, chat_ids, greedy, in_process, model_and_adapters

from qdora.serve import chat as chat_module

QDORA = [sys.executable, "-m", "qdora.cli"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return model_and_adapters(tmp_path_factory.mktemp("cli"))


def run(*args, stdin=None, timeout=240):
    return subprocess.run([*QDORA, *map(str, args)], capture_output=True, text=True, input=stdin, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "QDORA_ALLOCATOR": "system"})


def answer(model_dir, adapter, prompt, n, system=None):
    model, tok = in_process(model_dir, adapter)
    return tok.decode(greedy(model, tok, chat_ids(tok, prompt, system), n), skip_special_tokens=True)


def test_chat_answers_once_as_generate_does(files):
    model_dir, adapters = files
    r = run("chat", "--model", model_dir, "--adapter", adapters["qd"], "--prompt", PROMPTS[0],
            "--max-new-tokens", 12, "--system", "Be brief.")
    assert r.returncode == 0, r.stderr
    assert r.stdout == answer(model_dir, adapters["qd"], PROMPTS[0], 12, "Be brief.") + "\n"


def test_chat_compares_adapters_side_by_side_from_standard_input(files):
    model_dir, adapters = files
    r = run("chat", "--model", model_dir, "--adapter", f"one={adapters['qd']}", "--adapter", f"two={adapters['pd']}",
            "--with-base", "--max-new-tokens", 10, stdin=PROMPTS[1] + "\n")
    assert r.returncode == 0, r.stderr
    want = "".join(f"\n[{label}]\n" + answer(model_dir, path, PROMPTS[1], 10) + "\n"
                   for label, path in (("base", None), ("one", adapters["qd"]), ("two", adapters["pd"])))
    assert r.stdout == want


def test_the_interactive_chat_keeps_the_conversation_and_resets_it(files, monkeypatch, capsys):
    model_dir, adapters = files
    lines = iter([PROMPTS[0], "/reset", PROMPTS[0], "/nonsense", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    args = argparse.Namespace(model=str(model_dir), adapter=[str(adapters["ql"])], with_base=False, system=None,
                              prompt=None, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=None, base="auto")
    assert chat_module.chat(args) == 0
    out, err = capsys.readouterr()
    one = answer(model_dir, adapters["ql"], PROMPTS[0], 8)
    assert out == f"{one}\n{one}\n"  # after /reset the same question gets the same first answer
    assert "conversation reset" in err and "unknown command /nonsense" in err


def test_the_second_turn_sees_the_first(files, monkeypatch, capsys):
    model_dir, adapters = files
    lines = iter([PROMPTS[0], PROMPTS[1]])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))  # StopIteration ends it like EOF
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    captured = []
    real = chat_module.prompt_ids
    monkeypatch.setattr(chat_module, "prompt_ids", lambda tok, system, history, prompt:
                        captured.append([dict(m) for m in history]) or real(tok, system, history, prompt))
    args = argparse.Namespace(model=str(model_dir), adapter=None, with_base=False, system=None, prompt=None,
                              max_new_tokens=4, temperature=0.0, top_p=1.0, seed=None, base="auto")
    with pytest.raises(StopIteration):
        chat_module.chat(args)
    first_answer = capsys.readouterr().out.splitlines()[0]
    assert captured[0] == [] and captured[1][0] == {"role": "user", "content": PROMPTS[0]}
    assert captured[1][1] == {"role": "assistant", "content": first_answer}


@pytest.mark.parametrize("extra, words", [
    (["--adapter", "a=/nowhere/x"], "adapter folder not found: /nowhere/x"),
    (["--adapter", "a=ADAPTER", "--adapter", "a=ADAPTER"], "two adapters are named 'a'"),
    (["--adapter", "tiny=ADAPTER", "--name", "tiny"], "the base is served as 'tiny' and so is an adapter"),
    (["--port", "70000"], "--port 70000 must be in 1..65535"),
    (["--max-batch", "0"], "--max-batch 0 must be >= 1"),
])
def test_serve_refuses_bad_options_in_one_line(files, extra, words):
    model_dir, adapters = files
    extra = [e.replace("ADAPTER", str(adapters["qd"])) for e in extra]
    start = time.perf_counter()
    r = run("serve", "--model", model_dir, *extra)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("qdora serve: error: ") and words in r.stderr, r.stderr
    assert time.perf_counter() - start < 60


def test_serve_refuses_a_port_in_use_and_a_foreign_adapter(files, tmp_path):
    model_dir, adapters = files
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("serve", "--model", model_dir, "--port", s.getsockname()[1])
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and r.stderr.count("\n") == 1
    from models import build, llama3_config

    from qdora import AdapterConfig, add_adapters, save_adapter
    other = add_adapters(build(llama3_config(hidden_size=32, vocab_size=512, intermediate_size=128)),
                         AdapterConfig(method="qdora", r=2, alpha=4), verbose=False)
    save_adapter(other, tmp_path / "other")
    r = run("serve", "--model", model_dir, "--adapter", f"x={tmp_path / 'other'}", "--port", free_port())
    assert r.returncode == 2 and "qdora serve: error: adapter" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_running_request_and_exits(files):
    model_dir, adapters = files
    port = free_port()
    proc = subprocess.Popen([*QDORA, "serve", "--model", str(model_dir), "--adapter", f"qd={adapters['qd']}",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "QDORA_ALLOCATOR": "system", "QDORA_API_KEY": "sk-env"})
    key = {"Authorization": "Bearer sk-env"}
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(urllib.request.Request(url + "/health", headers=key), timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        body = json.dumps({"model": "qd", "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 150,
                           "temperature": 0, "stream": True}).encode()
        with pytest.raises(urllib.error.HTTPError, match="401"):  # the key from the environment guards it
            urllib.request.urlopen(url + "/v1/models", timeout=5)
        req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json", **key})
        resp = urllib.request.urlopen(req, timeout=120)
        assert resp.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        rest = resp.read().decode()
        events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
        assert rest.rstrip().endswith("data: [DONE]")
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")  # answered to its end
        # uvicorn re-raises the signal once it has shut down, so the exit says SIGTERM (143 in a shell)
        assert proc.wait(60) == -signal.SIGTERM
        stderr = proc.stderr.read()
        assert f"http://127.0.0.1:{port}/v1 serving m, qd (API key required)" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
