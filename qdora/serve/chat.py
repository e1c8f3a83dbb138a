"""`qdora chat`: talk to a base and its adapters, unmerged, in the terminal (or answer once, for scripts).

With several models (`--adapter A --adapter B`, `--with-base`) each turn is answered by every one of
them, side by side in the engine's one batch; the first streams as it is generated, the others follow,
each under its name. Each model keeps its own conversation.
"""

from __future__ import annotations

import sys
import threading

from qdora.serve.engine import Engine, Request, Sampling
from qdora.serve.load import open_bank, parse_adapters
from qdora.serve.options import HELP


def _render(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template; use a chat (instruct) model, or set one "
                         "(qdora train --chat-template writes it with the adapter)")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def prompt_ids(tokenizer, system: str | None, history: list[dict], prompt: str) -> list[int]:
    """The token ids of a conversation `history` plus the user's `prompt`, with the model's template."""
    messages = ([{"role": "system", "content": system}] if system else []) + history + \
        [{"role": "user", "content": prompt}]
    return _render(tokenizer, messages)


def chat(args) -> int:
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed)
    problems = sampling.problems()
    if problems:
        flags = {"max_new_tokens": "--max-new-tokens", "top_p": "--top-p", "temperature": "--temperature",
                 "seed": "--seed"}
        raise ValueError("; ".join(flags.get(p.split("=")[0], "") + "=" + p.split("=", 1)[1] for p in problems))
    adapters = parse_adapters(args.adapter)
    once = args.prompt
    if once == "-" or (once is None and not sys.stdin.isatty()):
        once = sys.stdin.read().strip()
        if not once:
            raise ValueError("no prompt on standard input")
    bank, tokenizer, _ = open_bank(args.model, adapters, args.base, progress=sys.stderr.isatty())
    names: list[str | None] = [n for n, _ in adapters]
    if args.with_base or not names:
        names = [None] + names
    label = {n: n if n is not None else "base" for n in names}
    engine = Engine(bank, tokenizer, max_batch=max(1, len(names))).start()
    histories: dict[str | None, list[dict]] = {n: [] for n in names}
    system = args.system
    try:
        if once is not None:
            _turn(engine, tokenizer, names, label, histories, system, once, sampling)
            return 0
        print(f"qdora chat: {', '.join(label[n] for n in names)}. {HELP}", file=sys.stderr)
        while True:
            try:
                line = input("\nyou> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                histories = {n: [] for n in names}
                print("(conversation reset)", file=sys.stderr)
                continue
            if text.startswith("/system"):
                system = text[len("/system"):].strip() or None
                histories = {n: [] for n in names}
                print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)", file=sys.stderr)
                continue
            if text.startswith("/"):
                print(f"unknown command {text.split()[0]}; {HELP}", file=sys.stderr)
                continue
            _turn(engine, tokenizer, names, label, histories, system, text, sampling)
    finally:
        engine.stop(drain=False)


def _turn(engine, tokenizer, names, label, histories, system, text, sampling) -> None:
    """One prompt answered by every model; the first streams, the others print when it is done."""
    first = names[0]
    printed = threading.Lock()

    def stream(event):
        if event.text:
            with printed:
                sys.stdout.write(event.text)
                sys.stdout.flush()

    requests = {}
    for n in names:
        ids = prompt_ids(tokenizer, system, histories[n], text)
        listener = stream if n == first else None
        requests[n] = engine.submit(Request(ids, adapter=n, sampling=sampling, on_event=listener))
    try:
        for n in names:
            if len(names) > 1:
                print(f"\n[{label[n]}]")
            if n == first:
                requests[n].done.wait()
                print()
            else:
                requests[n].done.wait()
                print(requests[n].text)
            req = requests[n]
            if req.finish == "error":
                raise RuntimeError(f"{label[n]}: generation failed: {req.error}")
            histories[n] += [{"role": "user", "content": text}, {"role": "assistant", "content": req.text}]
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
        for req in requests.values():
            req.cancel()
        print("\n(interrupted)", file=sys.stderr)
        if not sys.stdin.isatty():
            raise

