"""`qdora bench generate`: unmerged decoding speed, and `qdora serve`'s throughput under concurrent clients.

Part 1, one request at a time. On one model (default SmolLM2-135M-Instruct), every linear projection
of every decoder layer adapted at rank `--r`, greedy, batch 1, `--tokens` new tokens after a chat
prompt (no end-of-sequence token before the last, as `generate`'s `min_new_tokens` and vLLM's `min_tokens`
do, so every variant makes exactly as many): tokens/s of
  - qdora's engine (`qdora serve`/`chat`), QDoRA and QLoRA adapters in one `AdapterBank` over one NF4 base;
  - qdora in-process: `load_adapter` then `model.generate`, QDoRA (row norms cached in eval mode) and QLoRA;
  - PEFT's DoRA and LoRA, unmerged, over the 4-bit base transformers loads with `BitsAndBytesConfig`;
  - the QDoRA adapter merged (`qdora merge`'s fp32 checkpoint) and run by transformers, for the price of
    serving unmerged.
Each variant runs `--reps` times, round-robin, so machine noise hits them alike; medians reported. The
adapters are random (B and the magnitude moved off their initial values), the same for qdora's variants;
qdora's engine and in-process answers are checked to be the same tokens.

Part 2, the server. `qdora serve`'s application on the loopback address with the QDoRA and QLoRA adapters;
K concurrent clients (`--clients`), each asking for `--tokens` tokens once, alternating QDoRA, QLoRA and
the base; aggregate tokens/s (all answers' tokens over the wall time from the first request to the last
answer), each client's own rate, and the mean rows per decode forward. Then K clients of one adapter, for
the cost of mixing adapters in a batch.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from qdora.core.config import AdapterConfig
from qdora.core.layer import QDoRALinear
from qdora.core.safetensors_io import write_text_atomic
from qdora.eval.common import benchmark_model, peft_on_bnb_4bit
from qdora.models.adapter_io import load_adapter
from qdora.models.adapter_save import save_adapter
from qdora.models.loading import load_model
from qdora.options import Parser
from qdora.serve.engine import Engine, Request, Sampling
from qdora.serve.load import open_bank

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = "Explain in a few sentences why the sky is blue."


def make_adapters(path: str, r: int, out: Path) -> dict[str, Path]:
    """A random QDoRA and QLoRA adapter (every projection, rank r) written to `out`."""
    folders = {}
    for seed, method in enumerate(("qdora", "qlora")):
        cfg = AdapterConfig(method=method, r=r, alpha=2 * r, dropout=0.0, target_modules=ALL_LINEAR,
                            adapter_dtype="float32")
        model, _ = load_model(path, method=method, cfg=cfg, progress=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, QDoRALinear):
                    layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
                    if layer.use_dora:
                        layer.magnitude_delta.copy_(torch.randn(layer.magnitude_delta.shape, generator=gen) * 0.01)
        save_adapter(model, out / method)
        folders[method] = out / method
    return folders


def prompt_ids(tok) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def decode_speed(path: str, adapters: dict[str, Path], r: int, tokens: int, reps: int, peft: bool,
                 merged: Path | None = None) -> dict:
    bank, tok, _ = open_bank(path, list(adapters.items()), progress=False)
    engine = Engine(bank, tok, max_batch=1).start()
    try:
        return _decode_speed(engine, tok, path, adapters, r, tokens, reps, peft, merged)
    finally:
        engine.stop(drain=False)


def _decode_speed(engine, tok, path, adapters, r, tokens, reps, peft, merged) -> dict:
    ids = prompt_ids(tok)
    variants = {}

    def engine_run(name):
        def go():
            return engine.generate(Request(ids, adapter=name, sampling=Sampling(max_new_tokens=tokens,
                                                                                 min_tokens=tokens)), 3600).tokens
        return go

    def hf_run(model):
        def go():
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
            return out[0, len(ids):].tolist()
        return go

    variants["qdora engine, QDoRA"] = engine_run("qdora")
    variants["qdora engine, QLoRA"] = engine_run("qlora")
    for method, folder in adapters.items():
        model, _ = load_model(path, method=method, add=False, progress=False)
        load_adapter(model, folder, verbose=False)
        variants[f"qdora in-process, {'QDoRA' if method == 'qdora' else 'QLoRA'}"] = hf_run(model.eval())
    if merged is not None:
        from transformers import AutoModelForCausalLM  # heavy, used here only

        from qdora.export.merge import merge_and_save  # heavy
        model, _ = load_model(path, method="qdora", add=False, progress=False)
        load_adapter(model, adapters["qdora"], verbose=False)
        merge_and_save(model, merged, dtype=torch.float32)
        del model
        plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        variants["QDoRA merged, fp32 (transformers)"] = hf_run(plain)
    if peft:
        for use_dora in (True, False):
            model = peft_on_bnb_4bit(path, r, 2 * r, 0.0, use_dora, ALL_LINEAR).eval()
            variants[f"PEFT {'DoRA' if use_dora else 'LoRA'} (bnb 4-bit)"] = hf_run(model)
    times: dict[str, list[float]] = {k: [] for k in variants}
    answers = {}
    for name, fn in variants.items():  # a warm-up of each
        answers[name] = fn()
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    result = {name: {"median_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t), "times_s": t}
              for name, t in times.items()}
    result["same tokens, engine and in-process"] = {
        m: answers[f"qdora engine, {m}"] == answers[f"qdora in-process, {m}"] for m in ("QDoRA", "QLoRA")}
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_throughput(path: str, adapters: dict[str, Path], tokens: int, clients: list[int]) -> list[dict]:
    import uvicorn  # the serve extra

    from qdora.serve.server import App, ServeOptions  # fastapi

    bank, tok, _ = open_bank(path, list(adapters.items()), progress=False)
    engine = Engine(bank, tok, max_batch=max(clients)).start()
    app = App(engine, ServeOptions(base_name="base"))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app.asgi, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:  # the server and the engine stop whatever happens
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the benchmark's server did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
        return _throughput(engine, port, tokens, clients)
    finally:
        server.should_exit = True
        thread.join(60)
        engine.stop(drain=False)


def _throughput(engine, port: int, tokens: int, clients: list[int]) -> list[dict]:
    def ask(model: str) -> tuple[int, float]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
                           "temperature": 0, "min_tokens": tokens})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        data = json.loads(conn.getresponse().read())
        conn.close()
        return data["usage"]["completion_tokens"], time.perf_counter() - t0

    rows = []
    ask("qdora")  # warm-up
    for k in clients:
        for mix in (("qdora", "qlora", "base"), ("qdora",)) if k > 1 else (("qdora",),):
            steps, batch_rows = engine.stats.decode_steps, engine.stats.decode_rows
            t0 = time.perf_counter()
            with ThreadPoolExecutor(k) as pool:
                done = list(pool.map(ask, [mix[i % len(mix)] for i in range(k)]))
            wall = time.perf_counter() - t0
            total = sum(n for n, _ in done)
            forwards = engine.stats.decode_steps - steps
            rows.append({"clients": k, "models": "/".join(mix), "tokens": total, "wall_s": wall,
                         "tokens_per_s": total / wall,
                         "per_client_tokens_per_s": statistics.median(n / s for n, s in done),
                         "mean_rows_per_forward": (engine.stats.decode_rows - batch_rows) / max(1, forwards)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="qdora bench generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per answer (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed runs per variant (default: %(default)s)")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients of part 2, comma-separated; '' skips it")
    p.add_argument("--no-peft", action="store_true", help="leave PEFT's variants out")
    p.add_argument("--no-merged", action="store_true", help="leave the merged model out")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.reps < 1 or args.r < 1:
        raise ValueError("--tokens, --reps and --r must be >= 1")
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if any(c < 1 for c in clients):
        raise ValueError(f"--clients {args.clients!r}: each must be >= 1")
    path = benchmark_model(args.model)
    report = {"model": path, "r": args.r, "tokens": args.tokens, "reps": args.reps,
              "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(path, args.r, Path(tmp))
        speed = decode_speed(path, adapters, args.r, args.tokens, args.reps, not args.no_peft,
                             None if args.no_merged else Path(tmp) / "merged")
        report["decode"] = speed
        same = speed.pop("same tokens, engine and in-process")
        print(f"Part 1: batch 1, greedy, {args.tokens} new tokens, all 7 projections at r={args.r}, "
              f"{torch.get_num_threads()} threads, median of {args.reps}\n")
        print("| variant | tokens/s | median (s) |\n|---|---|---|")
        for name, v in speed.items():
            print(f"| {name} | {v['tokens_per_s']:.2f} | {v['median_s']:.2f} |")
        t = {k: v["tokens_per_s"] for k, v in speed.items()}
        print(f"\n- engine QDoRA / engine QLoRA: {t['qdora engine, QDoRA'] / t['qdora engine, QLoRA']:.3f}")
        print(f"- engine QDoRA / in-process QLoRA: {t['qdora engine, QDoRA'] / t['qdora in-process, QLoRA']:.3f}")
        if "PEFT DoRA (bnb 4-bit)" in t:
            print(f"- engine QDoRA / PEFT DoRA: {t['qdora engine, QDoRA'] / t['PEFT DoRA (bnb 4-bit)']:.2f}")
            print(f"- PEFT DoRA / PEFT LoRA: {t['PEFT DoRA (bnb 4-bit)'] / t['PEFT LoRA (bnb 4-bit)']:.3f}")
        print(f"- the engine's tokens equal in-process generate's: {same}")
        report["same_tokens"] = same
        if clients:
            rows = server_throughput(path, adapters, args.tokens, clients)
            report["server"] = rows
            print(f"\nPart 2: qdora serve on 127.0.0.1, {args.tokens} tokens per answer, the clients' requests "
                  "sent at once\n")
            print("| clients | models | tokens/s (all) | tokens/s per client (median) | rows per forward |")
            print("|---|---|---|---|---|")
            for row in rows:
                print(f"| {row['clients']} | {row['models']} | {row['tokens_per_s']:.1f} | "
                      f"{row['per_client_tokens_per_s']:.2f} | {row['mean_rows_per_forward']:.1f} |")
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
