"""Many adapters, unmerged, over one base: `AdapterBank` and its layer, `BankLinear`.

A fine-tuned layer computes `y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + bias` with `g = m / ||W0 + s·B·A||`
(LoRA: `g = 1`). For serving nothing trains, so each adapter's `g` is computed once, when it is
loaded, by the same blocked formula its `QDoRALinear` uses in eval mode; a forward then costs one
pass over the shared base for every row of the batch, whichever adapter each row asks for, and one
rank-r product and one fused epilogue per adapter. Rows of one batch may ask for different adapters
(or for the base): the engine orders the batch so that each adapter's rows are contiguous and says
which rows are whose with `AdapterBank.routing`.

A request answered alone goes through exactly the operations of an in-process `QDoRALinear` in eval
mode (the tests check it bit for bit); rows batched with others differ from it only by the rounding
of a matmul with more rows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn

from qdora.core.config import AdapterConfig
from qdora.core.experts import AdaptedRouter
from qdora.core.function import factored_norm_sq
from qdora.core.layer import QDoRALinear
from qdora.core.nf4 import RowBlocks
from qdora.kernels.ops import dora_epilogue_
from qdora.models.adapter_io import adapter_config, load_adapter, read_adapter
from qdora.models.adapter_save import adapter_layers
from qdora.models.moe import file_expert_count

BASE = None
"""The route of rows that ask for no adapter."""

Route = str | None | list[tuple[str | None, int, int]]
"""Which rows use which adapter: one name (or `BASE`) for the whole batch, or `(name, first row,
end row)` spans over the batch dimension, in order, covering every row."""


@dataclass(frozen=True)
class LayerAdapter:
    """One adapter's tensors at one layer, ready for the forward: `A`, `B` in the compute dtype (None
    for magnitude only), `g = m / ||W0 + s·B·A||` in fp32 (None for LoRA) and the scale `s`."""

    A: torch.Tensor | None
    B: torch.Tensor | None
    g: torch.Tensor | None
    scaling: float

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.g) if t is not None)


def layer_adapter(layer: QDoRALinear, compute_dtype: torch.dtype) -> LayerAdapter:
    """Freeze an adapted layer's current values into a `LayerAdapter`: the row norm by the same blocked
    products `DoRAFunction` runs in eval mode (`P = W0·Aᵀ` block by block in the compute dtype)."""
    with torch.no_grad():
        A, B = layer.direction_factors()
        s = float(layer.scaling)
        Ac = A.detach().to(compute_dtype) if A is not None else None
        Bc = B.detach().to(compute_dtype) if B is not None else None
        g = None
        if layer.use_dora:
            blocks: RowBlocks = layer._blocks
            c = layer.base_row_sq_norm
            if A is not None:
                P = torch.empty(blocks.out_features, A.shape[0], dtype=torch.float32, device=c.device)
                for r0, r1, W in blocks.blocks(compute_dtype):
                    P[r0:r1] = W @ Ac.t()
                n = factored_norm_sq(c, P, A.detach().float(), B.detach().float(), s).clamp_min_(0).sqrt_()
            else:
                n = c.clamp_min(0).sqrt()
            g = layer.magnitude.detach().float() / n.clamp_min(layer.eps)
        return LayerAdapter(Ac, Bc, g, s)


class BankLinear(nn.Module):
    """A frozen linear layer with any number of adapters over it, chosen per row by its bank's route.
    A batch with adapted rows takes one pass over the base for all its rows; rows whose adapter does
    not adapt this layer (or that ask for the base) then get `x·W0ᵀ + bias` from that pass. A batch
    without adapted rows gets the base layer's own forward, as a model without adapters would."""

    def __init__(self, base_layer: nn.Module, blocks: RowBlocks, compute_dtype: torch.dtype, bank: AdapterBank):
        super().__init__()
        self.base_layer = base_layer
        self._blocks = blocks
        self.in_features, self.out_features = blocks.in_features, blocks.out_features
        self.compute_dtype = compute_dtype
        self.adapters: dict[str, LayerAdapter] = {}
        self._bank = (bank,)  # a tuple: not a submodule, no reference cycle in the module tree

    def _adapted(self, x2: torch.Tensor, spans: list[tuple[LayerAdapter | None, int, int]]) -> torch.Tensor:
        """`g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + bias` for the rows of `x2` (2-D), span by span (`x·W0ᵀ + bias`
        for a span without adapter): one pass over the base for all of them."""
        cd = self.compute_dtype
        x2 = x2.to(cd)
        z = torch.empty(x2.shape[0], self.out_features, dtype=cd, device=x2.device)
        for r0, r1, W in self._blocks.blocks(cd):
            torch.mm(x2, W.t(), out=z[:, r0:r1])
        bias = self.base_layer.bias
        for ad, t0, t1 in spans:
            if ad is None:
                dora_epilogue_(z[t0:t1], None, None, None, bias, 0.0)
                continue
            a = x2[t0:t1] @ ad.A.t() if ad.A is not None else None
            dora_epilogue_(z[t0:t1], a, ad.B, ad.g, bias, float(ad.scaling))
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self._bank[0].route
        if isinstance(route, str) or route is BASE:
            ad = self.adapters.get(route) if route is not BASE else None
            if ad is None:
                return self.base_layer(x)
            z = self._adapted(x.reshape(-1, self.in_features), [(ad, 0, x.numel() // self.in_features)])
            return z.view(*x.shape[:-1], self.out_features).to(x.dtype)
        if x.dim() < 2 or route[-1][2] != x.shape[0]:
            raise RuntimeError(f"the bank's route covers {route[-1][2]} rows, the input has shape {tuple(x.shape)}")
        if not any(name in self.adapters for name, _, _ in route):
            return self.base_layer(x)
        per_row = x[0].numel() // self.in_features  # tokens per batch row
        spans = [(self.adapters.get(name), b0 * per_row, b1 * per_row) for name, b0, b1 in route]
        z = self._adapted(x.reshape(-1, self.in_features), spans)
        return z.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={sorted(self.adapters)}"


@dataclass(frozen=True)
class AdapterInfo:
    """What the bank knows of a loaded adapter."""

    name: str
    path: Path
    format: str           # "qdora" or "peft"
    method: str           # the method it was trained with (PEFT files: qlora/qdora over an NF4 base)
    r: int
    layers: int
    nbytes: int


class AdapterBank:
    """Adapters held unmerged over one model's frozen layers (`add`, `remove`), each row of a batch
    routed to one of them (`routing`, `use`).

    `model` is a base with no adapters (`qdora.load_model(path, add=False)`). Adding an adapter runs
    every check `qdora.load_adapter` runs (the base it was trained on, its modules, its shapes), then
    keeps only its tensors and `g`; the model's layers that any adapter adapts become `BankLinear`.
    Mixture-of-experts adapters (adapted experts or routers) are refused: merge those instead.
    """

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype | None = None):
        if adapter_layers(model):
            raise ValueError("the model already has qdora adapters: give the bank a base loaded with add=False")
        self.model = model
        device = next(model.parameters()).device
        self.compute_dtype = compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.route: Route = BASE
        self.layers: dict[str, BankLinear] = {}
        self.adapters: dict[str, AdapterInfo] = {}

    # ---- routing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def routing(self, route: Route) -> Iterator[None]:
        """Within the block, forwards route rows as `route` says (see `Route`)."""
        if isinstance(route, str) and route not in self.adapters:
            raise KeyError(f"no adapter named {route!r} (loaded: {sorted(self.adapters) or 'none'})")
        if isinstance(route, list):
            for name, _, _ in route:
                if name is not BASE and name not in self.adapters:
                    raise KeyError(f"no adapter named {name!r} (loaded: {sorted(self.adapters) or 'none'})")
        previous, self.route = self.route, route
        try:
            yield
        finally:
            self.route = previous

    def use(self, name: str | None):
        """`with bank.use("a"): model.generate(...)`: every row through adapter `a` (None: the base)."""
        return self.routing(name)

    # ---- loading ------------------------------------------------------------------------------
    def _unwrap(self) -> None:
        for name, layer in self.layers.items():
            _set_submodule(self.model, name, layer.base_layer)

    def _wrap(self) -> None:
        for name, layer in self.layers.items():
            _set_submodule(self.model, name, layer)

    def add(self, name: str, path: str | os.PathLike) -> AdapterInfo:
        """Load the adapter folder `path` (qdora or PEFT format) under `name`."""
        if not name or name in self.adapters:
            raise ValueError(f"adapter name {name!r} is {'empty' if not name else 'already loaded'}: "
                             "give each adapter its own name")
        path = Path(path)
        fmt, meta, modules = read_adapter(path)
        if file_expert_count(modules) is not None:
            raise ValueError(f"adapter {path} adapts the experts of a mixture-of-experts model, which cannot be "
                             "served unmerged yet: merge it (qdora merge) and serve the merged model")
        cfg: AdapterConfig = adapter_config(fmt, meta, modules, self.quantized)
        self._unwrap()
        try:
            load_adapter(self.model, path, verbose=False)  # every check, and the values
            routers = [n for n, m in self.model.named_modules() if isinstance(m, AdaptedRouter)]
            if routers:
                raise ValueError(f"adapter {path} adapts mixture-of-experts routers ({routers[0]}, ...), which cannot "
                                 "be served unmerged yet: merge it (qdora merge) and serve the merged model")
            harvested = {n: (layer_adapter(layer, self.compute_dtype), layer)
                         for n, layer in adapter_layers(self.model).items()}
        finally:  # back to the plain base, whatever happened
            for n, m in list(self.model.named_modules()):
                if isinstance(m, AdaptedRouter):
                    _set_submodule(self.model, n, m.router)
            for n, layer in adapter_layers(self.model).items():
                _set_submodule(self.model, n, layer.base_layer)
            for attr in ("qdora_config", "save_pretrained", "disable_adapter", "disable_adapters",
                         "enable_adapters"):  # what add_adapters set on the model
                self.model.__dict__.pop(attr, None)
            self._wrap()
        for n, (ad, layer) in harvested.items():
            bank_layer = self.layers.get(n)
            if bank_layer is None:
                bank_layer = BankLinear(layer.base_layer, layer._blocks, self.compute_dtype, self)
                self.layers[n] = bank_layer
                _set_submodule(self.model, n, bank_layer)
            bank_layer.adapters[name] = ad
        info = AdapterInfo(name=name, path=path, format=fmt, method=cfg.method, r=cfg.r, layers=len(harvested),
                           nbytes=sum(ad.nbytes for ad, _ in harvested.values()))
        self.adapters[name] = info
        return info

    def remove(self, name: str) -> None:
        """Unload adapter `name`; layers no adapter uses any more go back to the plain base."""
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} (loaded: {sorted(self.adapters) or 'none'})")
        del self.adapters[name]
        for n in list(self.layers):
            layer = self.layers[n]
            layer.adapters.pop(name, None)
            if not layer.adapters:
                _set_submodule(self.model, n, layer.base_layer)
                del self.layers[n]

    @property
    def quantized(self) -> bool:
        return any(isinstance(m, bnb.nn.Linear4bit) for m in self.model.modules())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
