"""The command lines of `qdora chat` and `qdora serve` (their parsers import nothing heavy), and `serve`:
every check that needs no loading first (the port, the adapters' names and folders, the key), one
line each, then the model, then the server."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from qdora.serve.options import API_KEY_ENV, BASES, HELP


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to a model and its adapters, unmerged (interactive, or --prompt once)",
                       description="Chat with --model and its adapters (unmerged over one base), with the model's own "
                                   "chat template; tokens stream as they are generated. With --prompt (or text on "
                                   "standard input) it answers once and exits. Several --adapter (and --with-base) "
                                   "answer the same prompt side by side. " + HELP + ".")
    p.add_argument("--model", required=True, help="the base model: checkpoint folder or .gguf")
    p.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                   help="an adapter folder (qdora or PEFT format); repeat to compare adapters")
    p.add_argument("--with-base", action="store_true", help="answer with the base model too (beside the adapters)")
    p.add_argument("--system", default=None, help="the system prompt")
    p.add_argument("--prompt", default=None, help="answer this once and exit ('-': read it from standard input)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="the sampling seed (with --temperature > 0)")
    p.add_argument("--base", default="auto", choices=BASES,
                   help="nf4: quantize the base; full: keep it as stored; auto (default): full only when every "
                        "adapter was trained over a full-precision base (lora, dora)")
    p.set_defaults(func=_chat)


def _chat(args) -> int:
    from qdora.serve.chat import chat  # heavy: torch, transformers
    return chat(args)




def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a model and its adapters, unmerged",
                       description="Serve --model and any number of adapters (unmerged over one base in memory) with "
                                   "OpenAI's API: GET /v1/models, POST /v1/chat/completions and /v1/completions "
                                   "(streamed with server-sent events, or not; `model` picks an adapter or the base), "
                                   "POST /v1/load_lora_adapter and /v1/unload_lora_adapter while it runs. Requests "
                                   "for any adapters are decoded together. SIGTERM finishes what runs and exits.")
    p.add_argument("--model", required=True, help="the base model: checkpoint folder or .gguf")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="an adapter folder (qdora or PEFT format) served as NAME; repeat for more")
    p.add_argument("--name", default=None, help="the base's id in /v1/models (default: the model folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route (or set {API_KEY_ENV})")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together at most (default 16)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="new tokens for a request that does not say (max_tokens), capped by the context (default 512)")
    p.add_argument("--base", default="auto", choices=BASES,
                   help="nf4: quantize the base; full: keep it as stored; auto (default): full only when every "
                        "adapter was trained over a full-precision base (lora, dora)")
    p.set_defaults(func=serve)


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, a port that is out of range or taken (bound as uvicorn binds it)."""
    if not 0 < port < 65536:
        raise ValueError(f"--port {port} must be in 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err} (another server there? "
                             "pick another --port)") from None


def serve(args) -> int:
    from qdora.models.loading import check_model_path  # heavy from here on: torch, transformers
    from qdora.serve.load import parse_adapters, read_specs  # heavy

    adapters = parse_adapters(args.adapter)
    name = args.name or Path(args.model).resolve().name.removesuffix(".gguf")
    if name in [n for n, _ in adapters]:
        raise ValueError(f"the base is served as {name!r} and so is an adapter: rename one (--name or NAME=DIR)")
    for flag, value in (("--max-batch", args.max_batch), ("--max-tokens", args.max_tokens)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_port(args.host, args.port)
    check_model_path(args.model)
    read_specs(adapters, args.base)  # every adapter folder readable, before the model loads

    try:
        import uvicorn  # the serve extra: pip install 'qdora[serve]'

        from qdora.serve.server import App, ServeOptions  # fastapi
    except ImportError as err:
        raise ImportError(f"qdora serve needs FastAPI and uvicorn ({err}): pip install 'qdora[serve]'") from None
    from qdora.serve.engine import Engine  # heavy
    from qdora.serve.load import open_bank  # heavy

    bank, tokenizer, _ = open_bank(args.model, adapters, args.base, progress=sys.stderr.isatty())
    engine = Engine(bank, tokenizer, max_batch=args.max_batch).start()
    app = App(engine, ServeOptions(base_name=name, api_key=api_key, default_max_tokens=args.max_tokens))
    served = ", ".join([name] + [n for n, _ in adapters])
    print(f"qdora serve: http://{args.host}:{args.port}/v1 serving {served}"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app.asgi, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=60)
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop(drain=True, timeout=60)
    return 0
