"""`qdora serve`'s HTTP API driven by the official `openai` client over the loopback address: greedy answers
equal `model.generate` in-process for every adapter and the base, streamed or not; 16 concurrent clients;
a client that leaves mid-stream; bad input answered in OpenAI's error shape while the server keeps serving;
the API key; adapters loaded and unloaded while it runs. The server runs in a thread of the test."""

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import PROMPTS, chat_ids, greedy, in_process, model_and_adapters

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from qdora.serve.engine import Engine  # noqa: E402  (after the skips: these need fastapi)
from qdora.serve.load import open_bank  # noqa: E402
from qdora.serve.server import App, ServeOptions  # noqa: E402

KEY = "sk-test-123"
BASE = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return model_and_adapters(tmp_path_factory.mktemp("http"))


@pytest.fixture(scope="module")
def server(files):
    model_dir, adapters = files
    bank, tok, _ = open_bank(model_dir, [("qd", adapters["qd"]), ("ql", adapters["ql"])], progress=False)
    engine = Engine(bank, tok, max_batch=16).start()
    app = App(engine, ServeOptions(base_name=BASE, api_key=KEY, default_max_tokens=16))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app.asgi, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:  # the server and the engine stop whatever happens to the tests (or to the start)
        for _ in range(200):
            if srv.started:
                break
            time.sleep(0.05)
        assert srv.started
        yield port, app, tok
    finally:
        srv.should_exit = True
        thread.join(30)
        engine.stop(drain=False, timeout=30)


@pytest.fixture(scope="module")
def oracles(files):
    model_dir, adapters = files
    return {BASE: in_process(model_dir, None)[0], "qd": in_process(model_dir, adapters["qd"])[0],
            "ql": in_process(model_dir, adapters["ql"])[0], "pd": in_process(model_dir, adapters["pd"])[0]}


def client(port, key=KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def expected(oracles, tok, model, prompt, n=12):
    return tok.decode(greedy(oracles[model], tok, chat_ids(tok, prompt), n), skip_special_tokens=True)


def raw(port, method, path, body: bytes | None = None, key=KEY):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def test_models_lists_the_base_and_the_adapters(server):
    port, _, _ = server
    ids = [m.id for m in client(port).models.list().data]
    assert ids == [BASE, "qd", "ql"]


@pytest.mark.parametrize("model", [BASE, "qd", "ql"])
def test_chat_answers_equal_generate_in_process(server, oracles, model):
    port, _, tok = server
    c = client(port)
    for prompt in PROMPTS[:2]:
        want = expected(oracles, tok, model, prompt)
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                      max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want
        assert r.usage.prompt_tokens == len(chat_ids(tok, prompt)) and r.usage.completion_tokens <= 12
        stream = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=12, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == want
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason


def test_completions_equal_generate_in_process(server, oracles):
    port, _, tok = server
    c = client(port)
    prompt = "The sky is"
    ids = tok(prompt).input_ids
    want = tok.decode(greedy(oracles["qd"], tok, ids, 10), skip_special_tokens=True)
    r = c.completions.create(model="qd", prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == want
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="qd", prompt=prompt, max_tokens=10,
                                                                         temperature=0, stream=True))
    assert streamed == want


def test_sixteen_concurrent_clients_are_all_answered_correctly(server, oracles):
    port, app, tok = server
    jobs = [(["qd", "ql", BASE][i % 3], PROMPTS[i % len(PROMPTS)], i % 2 == 0) for i in range(16)]

    def ask(job):
        model, prompt, stream = job
        c = client(port)
        kwargs = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0)
        if stream:
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True,
                                                                                                  **kwargs))
        return c.chat.completions.create(**kwargs).choices[0].message.content

    before = app.engine.stats.max_rows
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [expected(oracles, tok, m, p) for m, p, _ in jobs]
    assert app.engine.stats.max_rows > 1 or before > 1  # they were decoded together


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    port, app, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": "qd", "messages": [{"role": "user", "content": "Count: one two"}],
                       "max_tokens": 200, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: ")
    cancelled = app.engine.stats.cancelled
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    for _ in range(400):
        if app.engine.stats.cancelled > cancelled:
            break
        time.sleep(0.05)
    assert app.engine.stats.cancelled == cancelled + 1  # cancelled, not run to its 200 tokens
    assert app.engine.running == 0


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "does not exist"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 400, "model is required"),
    (json.dumps({"model": "qd", "messages": []}).encode(), 400, "messages must be"),
    (json.dumps({"model": "qd", "messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "role"),
    (json.dumps({"model": "qd", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}).encode(), 400,
     "temperature=3"),
    (json.dumps({"model": "qd", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"model": "qd", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), 400,
     "max_tokens=0"),
    (json.dumps({"model": "qd", "messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), 400, "n=2"),
    (json.dumps({"model": "qd", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}).encode(), 400,
     "stream="),
    (json.dumps({"model": "qd", "messages": [{"role": "user", "content": "one two " * 200}]}).encode(), 400,
     "context is 256"),
    (json.dumps({"model": "qd", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 250}).encode(), 400,
     "passes this model's context"),
])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server, oracles, body, status, words):
    port, _, tok = server
    got, data = raw(port, "POST", "/v1/chat/completions", body)
    assert got == status
    assert set(data["error"]) == {"message", "type", "param", "code"} and words in data["error"]["message"]
    r = client(port).chat.completions.create(model="ql", messages=[{"role": "user", "content": PROMPTS[0]}],
                                             max_tokens=6, temperature=0)
    assert r.choices[0].message.content == expected(oracles, tok, "ql", PROMPTS[0], 6)


def test_the_api_key_guards_every_route(server):
    port, _, _ = server
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", b"{}"),
                               ("POST", "/v1/load_lora_adapter", b"{}"), ("GET", "/health", None)):
        got, data = raw(port, method, path, body, key=None)
        assert got == 401 and data["error"]["code"] == "invalid_api_key", path
        assert raw(port, method, path, body, key="sk-wrong")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        client(port, key="sk-wrong").models.list()
    got, data = raw(port, "GET", "/v1/nothing-here")
    assert got == 404 and "error" in data


def test_adapters_load_and_unload_while_it_serves(server, files, oracles):
    port, _, tok = server
    _, adapters = files
    got, data = raw(port, "POST", "/v1/load_lora_adapter",
                    json.dumps({"lora_name": "pd", "lora_path": str(adapters["pd"])}).encode())
    assert got == 200 and data["id"] == "pd"
    c = client(port)
    assert "pd" in [m.id for m in c.models.list().data]
    r = c.chat.completions.create(model="pd", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=12,
                                  temperature=0)
    assert r.choices[0].message.content == expected(oracles, tok, "pd", PROMPTS[1])
    again = raw(port, "POST", "/v1/load_lora_adapter",
                json.dumps({"lora_name": "pd", "lora_path": str(adapters["pd"])}).encode())
    assert again[0] == 400 and "already named" in again[1]["error"]["message"]
    missing = raw(port, "POST", "/v1/load_lora_adapter", json.dumps({"lora_name": "x", "lora_path": "/no"}).encode())
    assert missing[0] == 400 and "not found" in missing[1]["error"]["message"]
    got, data = raw(port, "POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": "pd"}).encode())
    assert got == 200 and data["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="pd", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
