"""The generation engine behind `qdora chat` and `qdora serve`: requests for any adapter of one
`AdapterBank`, decoded together.

One thread owns the model. Each turn of its loop it admits waiting requests (each prompt is
prefilled alone, so a prompt's logits never depend on what else is running), merges them into the
running batch, and decodes one token for every running row in one forward: rows are ordered by
adapter, so each adapter's rows are one span of the batch (`AdapterBank.routing`), and rows of any
adapters, and of the base, share the pass over the base weights. The KV caches of rows of different
lengths are left-padded to one length and masked (the rows' positions stay their own). Finished,
cancelled or failed rows leave the batch at once; the padding no row needs any more is cut off.

Models whose cache is not one plain `DynamicCache` layer per decoder layer (sliding-window or
recurrent layers) are decoded one request per forward, in turn: correct, not batched.

Sampling follows OpenAI's parameters: `temperature` 0 is greedy (argmax, as `model.generate` with
`do_sample=False`), otherwise softmax of logits / temperature, cut to the smallest set of tokens whose
probability reaches `top_p`, drawn with the request's own generator (seeded by `seed`), so a seeded
request draws the same tokens whatever runs beside it (up to the rounding of batched matmuls).
"""

from __future__ import annotations

import inspect
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from qdora.serve.bank import BASE, AdapterBank


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. `temperature` 0 is greedy; `stop` strings end the answer (not included)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0            # end-of-sequence tokens are never picked before this many (generate's
                                   # min_new_tokens; benchmarks: a fixed answer length)

    def problems(self) -> list[str]:
        """What is wrong with these values, one line each (empty when nothing is)."""
        out = []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            out.append(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature <= 100:
            out.append(f"temperature={self.temperature!r} must be a number in [0, 100] (0: greedy)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            out.append(f"top_p={self.top_p!r} must be a number in (0, 1]")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            out.append(f"min_tokens={self.min_tokens!r} must be an integer >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            out.append(f"seed={self.seed!r} must be an integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            out.append(f"stop={list(self.stop)!r} must be non-empty strings")
        return out


@dataclass
class Event:
    """What a request hears: `text` (new text, possibly empty) as tokens come; at the end `finish`
    ("stop", "length", "cancelled" or "error"), with `error` set for an error."""

    text: str = ""
    token: int | None = None
    finish: str | None = None
    error: str | None = None


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One generation: `ids` (the prompt's token ids) through `adapter` (None: the base).
    `on_event` is called from the engine's thread; `cancel()` may be called from any thread."""

    ids: list[int]
    adapter: str | None = BASE
    sampling: Sampling = field(default_factory=Sampling)
    on_event: Callable[[Event], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    error: str | None = None
    started: float = 0.0
    first_token: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Row:
    req: Request
    position: int                  # the next token's position (its own, padding not counted)
    last: int                      # the token to feed next
    generator: torch.Generator | None
    sent: int = 0                  # characters of the answer already handed out
    max_new: int = 0


class _Batch:
    """Rows that share one KV cache, left-padded to one length, ordered by adapter."""

    def __init__(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor):
        self.rows, self.cache, self.mask = rows, cache, mask

    def select(self, index: list[int]) -> None:
        idx = torch.tensor(index, dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
        self.mask = self.mask.index_select(0, idx)
        self.rows = [self.rows[i] for i in index]
        # cut the columns that are padding in every row left
        keep_from = int((self.mask.cumsum(1) == 0).all(0).sum())
        if keep_from:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, keep_from:], layer.values[:, :, keep_from:]
            self.mask = self.mask[:, keep_from:]

    def merge(self, other: _Batch) -> None:
        """Join `other`'s rows, padding the shorter cache on the left, and order the rows by adapter."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)])
            mine.values = torch.cat([_pad_left(mine.values, length), _pad_left(theirs.values, length)])
        self.mask = torch.cat([_pad_left(self.mask, length, dim=1), _pad_left(other.mask, length, dim=1)])
        self.rows = self.rows + other.rows
        order = sorted(range(len(self.rows)), key=lambda i: (self.rows[i].req.adapter or "", i))
        if order != list(range(len(self.rows))):
            self.select(order)

    def route(self) -> list[tuple[str | None, int, int]]:
        spans: list[tuple[str | None, int, int]] = []
        for i, row in enumerate(self.rows):
            if spans and spans[-1][0] == row.req.adapter:
                spans[-1] = (row.req.adapter, spans[-1][1], i + 1)
            else:
                spans.append((row.req.adapter, i, i + 1))
        return spans


def _pad_left(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def eos_ids(model, tokenizer) -> set[int]:
    """Every token that ends an answer: the generation config's (one or a list) and the tokenizer's."""
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def context_length(model) -> int | None:
    """The longest sequence the model's positions allow (None when the config does not say)."""
    return getattr(model.config, "max_position_embeddings", None)


@dataclass
class Stats:
    """What the engine did: forwards, tokens, and how many rows each decode forward carried."""

    prefills: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    max_rows: int = 0
    mixed_steps: int = 0           # decode forwards whose rows asked for more than one adapter (or the base)
    tokens: int = 0
    requests: int = 0
    cancelled: int = 0
    errors: int = 0


class Engine:
    """Runs requests on `bank.model` from its own thread: `start()`, `submit(request)`, `stop()`.
    `max_batch` bounds the rows decoded together."""

    def __init__(self, bank: AdapterBank, tokenizer, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.bank, self.model, self.tokenizer = bank, bank.model, tokenizer
        self.max_batch = max_batch
        self.eos = eos_ids(self.model, tokenizer)
        self.context = context_length(self.model)
        self.device = next(self.model.parameters()).device
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.stats = Stats()
        self.lock = threading.Lock()   # held around every forward and every change to the bank
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._batches: list[_Batch] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batchable: bool | None = None

    # ---- the public side ----------------------------------------------------------------------
    def start(self) -> Engine:
        self.model.eval()
        self._thread = threading.Thread(target=self._loop, name="qdora-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, req: Request) -> Request:
        """Queue `req`; its events come through `req.on_event`, and `req.done` is set at the end."""
        if self._stopping:
            raise RuntimeError("the engine is stopping")
        if req.adapter is not BASE and req.adapter not in self.bank.adapters:
            raise KeyError(f"no adapter named {req.adapter!r}")
        problems = req.sampling.problems()
        if problems:
            raise ValueError("; ".join(problems))
        if not req.ids:
            raise ValueError("the prompt has no tokens")
        if self.context is not None and len(req.ids) >= self.context:
            raise ValueError(f"the prompt has {len(req.ids)} tokens; the model's context is {self.context}")
        req.started = time.perf_counter()
        self._waiting.put(req)
        self._wake.set()
        return req

    def generate(self, req: Request, timeout: float | None = None) -> Request:
        """Submit `req` and wait for it to finish."""
        self.submit(req)
        if not req.done.wait(timeout):
            req.cancel()
            raise TimeoutError(f"request {req.id} did not finish in {timeout} s")
        return req

    def users(self, adapter: str | None) -> int:
        """Requests for `adapter` waiting or running now."""
        running = sum(1 for b in list(self._batches) for r in list(b.rows) if r.req.adapter == adapter)
        return running + sum(1 for r in list(self._waiting.queue) if r.adapter == adapter)

    @property
    def running(self) -> int:
        """Rows being decoded now."""
        return sum(len(b.rows) for b in self._batches)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop: with `drain`, finish every request already submitted first; otherwise cancel them."""
        self._stopping = True
        if not drain:
            for b in self._batches:
                for row in b.rows:
                    row.req.cancel()
            while True:
                try:
                    req = self._waiting.get_nowait()
                except queue.Empty:
                    break
                self._finish(req, "cancelled")
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the engine's thread ------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():  # the caches are inference tensors: every change to them in this mode
            self._run()

    def _run(self) -> None:
        while True:
            admitted = self._admit()
            if self._batches:
                self._decode()
            elif not admitted:
                if self._stopping and self._waiting.empty():
                    return
                self._wake.wait(0.05)
                self._wake.clear()

    def _admit(self) -> bool:
        admitted = False
        while self.running < self.max_batch:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                break
            admitted = True
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            try:
                batch = self._prefill(req)
            except Exception as exc:  # the request fails, the engine goes on
                self._fail(req, exc)
                continue
            if batch is None:
                continue
            if self._batchable and self._batches:
                self._batches[0].merge(batch)
            else:
                self._batches.append(batch)
        return admitted

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, route):
        with self.lock, torch.inference_mode(), self.bank.routing(route):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self.cache_arg: cache})
        return out.logits[:, -1].float()

    def _prefill(self, req: Request) -> _Batch | None:
        ids = torch.tensor([req.ids], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, torch.arange(ids.shape[1], device=self.device)[None], cache, req.adapter)
        self.stats.prefills += 1
        if self._batchable is None:
            self._batchable = all(type(layer) is DynamicLayer for layer in cache.layers)
        s = req.sampling
        generator = None
        if s.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(s.seed if s.seed is not None else torch.seed())
        room = s.max_new_tokens if self.context is None else min(s.max_new_tokens, self.context - len(req.ids))
        row = _Row(req, position=len(req.ids), last=-1, generator=generator, max_new=room)
        if self._take(row, logits[0]):
            return None
        return _Batch([row], cache, mask)

    def _decode(self) -> None:
        for batch in list(self._batches):
            if not batch.rows:
                self._batches.remove(batch)
                continue
            ids = torch.tensor([[r.last] for r in batch.rows], dtype=torch.long, device=self.device)
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
            positions = torch.tensor([[r.position] for r in batch.rows], dtype=torch.long, device=self.device)
            route = batch.route()
            try:
                logits = self._forward(ids, batch.mask, positions, batch.cache, route)
            except Exception as exc:  # every row of the batch fails; the engine goes on
                for row in batch.rows:
                    self._fail(row.req, exc)
                self._batches.remove(batch)
                continue
            self.stats.decode_steps += 1
            self.stats.decode_rows += len(batch.rows)
            self.stats.max_rows = max(self.stats.max_rows, len(batch.rows))
            self.stats.mixed_steps += len(route) > 1
            keep = []
            for i, row in enumerate(batch.rows):
                row.position += 1
                if not self._take(row, logits[i]):
                    keep.append(i)
            if len(keep) < len(batch.rows):
                if keep:
                    batch.select(keep)
                else:
                    self._batches.remove(batch)

    def _take(self, row: _Row, logits: torch.Tensor) -> bool:
        """Pick the next token of `row` from `logits`, tell its request; True if the row is finished."""
        req = row.req
        if req.cancelled:
            self._finish(req, "cancelled")
            return True
        if len(req.tokens) < req.sampling.min_tokens and self.eos:
            logits = logits.clone()
            logits[list(self.eos)] = float("-inf")  # as generate's MinNewTokensLengthLogitsProcessor
        token = self._pick(logits, req.sampling, row.generator)
        if not req.tokens:
            req.first_token = time.perf_counter()
        self.stats.tokens += 1
        if token in self.eos:
            self._emit(row, final=True)
            self._finish(req, "stop")
            return True
        req.tokens.append(token)
        row.last = token
        stopped = self._emit(row, final=len(req.tokens) >= row.max_new)
        if stopped:
            self._finish(req, "stop")
            return True
        if len(req.tokens) >= row.max_new:
            self._finish(req, "length")
            return True
        return False

    @staticmethod
    def _pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
        if s.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1:
            p_sorted, order = probs.sort(descending=True)
            before = p_sorted.cumsum(0) - p_sorted      # probability of the tokens ranked above each
            p_sorted[before >= s.top_p] = 0             # the top token always stays
            probs = torch.zeros_like(probs).scatter_(0, order, p_sorted)
        return int(torch.multinomial(probs, 1, generator=generator))

    def _emit(self, row: _Row, final: bool) -> bool:
        """Hand out the answer's new text; True if a stop string ended it. Text that may still change
        (an incomplete character, or the start of a stop string) is held back until it cannot."""
        req = row.req
        text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        stop_at = min((i for i in (text.find(s) for s in req.sampling.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            text, final = text[:stop_at], True
        ready = len(text)
        if not final:
            if text.endswith("\ufffd"):
                ready = len(text.rstrip("\ufffd"))
            for s in req.sampling.stop:  # a stop string may be starting at the end
                for k in range(min(len(s) - 1, ready), 0, -1):
                    if text[:ready].endswith(s[:k]):
                        ready -= k
                        break
        req.text = text
        if ready > row.sent:
            self._send(req, Event(text=text[row.sent:ready], token=req.tokens[-1] if req.tokens else None))
            row.sent = ready
        return stop_at >= 0

    def _send(self, req: Request, event: Event) -> None:
        if req.on_event is not None:
            try:
                req.on_event(event)
            except Exception:  # a listener that fails (a closed pipe) cancels its own request only
                req.cancel()

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish, req.error = reason, error
        self.stats.requests += 1
        self.stats.cancelled += reason == "cancelled"
        self._send(req, Event(finish=reason, error=error))
        req.done.set()

    def _fail(self, req: Request, exc: Exception) -> None:
        self.stats.errors += 1
        self._finish(req, "error", f"{type(exc).__name__}: {exc}")
