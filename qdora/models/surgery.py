"""Model surgery: put adapters on the linear layers a config names, freeze everything else."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from torch import nn

from qdora.core.config import AdapterConfig, resolve_dtype
from qdora.core.experts import AdaptedRouter
from qdora.core.layer import QDoRALinear, VeRAProjections, exact_frozen_forward
from qdora.core.nf4 import adopt_linear4bit, is_repacked, linear4bit_from_linear, repacked_message
from qdora.models.adapter_save import route_save_pretrained
from qdora.models.moe import (
    expert_count,
    expert_matches,
    expert_owner,
    experts_of,
    fused_experts,
    restore_experts,
    router_linear,
    routers,
    split_experts,
)
from qdora.models.switch import attach_switches


def matches(name: str, pattern: str) -> bool:
    """Exact name, dotted suffix (`q_proj` matches `model.layers.0.self_attn.q_proj`), or `re:<regex>`
    matched against the full name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


ALL_LINEAR = ("all", "all-linear")
"""Targets that name every linear layer but the output head (PEFT's `all-linear`); the experts of an
MoE are not linear layers there, so they are added by name (`("all-linear", "experts")`)."""


_MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "w1", "w2", "w3")
"""Dense MLP projection names: on an MoE whose every MLP is experts they name nothing (said so)."""


def targets(model: nn.Module, name: str, pattern: str) -> bool:
    """Whether `pattern` (a target, magnitude-only or keep-full-precision pattern) names linear module
    `name`; an expert projection is named through its experts module (`qdora.models.moe`)."""
    owner = expert_owner(name, model)
    if owner is None:
        return matches(name, pattern)
    return expert_matches(name, *owner, pattern, matches)


def experts_needed(name: str, cfg: AdapterConfig) -> bool:
    """Whether fused experts module `name` must be held apart for `cfg`: targeted, or quantized."""
    for proj in ("gate_up_proj", "down_proj"):
        if any(expert_matches(f"{name}.{proj}.0", name, proj, p, matches)
               for p in (*cfg.target_modules, *cfg.magnitude_only_modules)):
            return True
    return cfg.quantized and cfg.quantize_frozen and not any(matches(name, p) for p in cfg.keep_full_precision)


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name]


def _experts_listing(model: nn.Module) -> str:
    found = {**experts_of(model), **fused_experts(model)}
    if not found:
        return ""
    name = next(iter(found))
    return (f"\nthe model's experts: {len(found)} modules like {name} ({expert_count(model)} experts each; "
            "targets 'experts', 'experts.gate_up_proj', 'experts.down_proj')")


def _summarize(names: list[str], limit: int = 12) -> str:
    """Short listing of module names: the distinct last components, then a few full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    examples = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"leaf names: {', '.join(leaves) or '(none)'}; e.g. {examples or '(none)'}"


@dataclass(frozen=True)
class ParamReport:
    trainable: int
    total: int
    adapted_modules: int
    magnitude_only_modules: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable: {self.percent:.4f}% || adapted modules: {self.adapted_modules} "
                f"(+{self.magnitude_only_modules} magnitude-only)")


def param_report(model: nn.Module) -> ParamReport:
    # An NF4 weight counts by its unpacked shape, from the quantization state on the weight
    # (`Params4bit`) or, once prepared for FSDP (a plain packed parameter), on the module.
    unpacked = {}
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        state = getattr(m.weight, "quant_state", None)
        state = getattr(m, "quant_state", None) if state is None else state
        if state is not None:
            unpacked[id(m.weight)] = int(torch.Size(state.shape).numel())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(unpacked.get(id(p), p.numel()) for p in model.parameters())
    layers = [m for m in model.modules() if isinstance(m, QDoRALinear)]
    mag_only = sum(1 for m in layers if m.r == 0)
    return ParamReport(trainable, total, len(layers) - mag_only, mag_only)


@dataclass(frozen=True)
class AdapterPlan:
    """What `add_adapters` does to which linear module, decided from names and shapes alone (so it
    can be made for a model whose weights are still on the meta device): `direction` layers get
    `m`, `A`, `B` (or LoRA's `A`, `B`), `magnitude_only` layers `m` alone, and with `quantize_frozen`
    the other linear layers except `keep_full_precision` are quantized to NF4 without an adapter."""
    cfg: AdapterConfig
    direction: tuple[str, ...]
    magnitude_only: tuple[str, ...]
    frozen: tuple[str, ...]
    linears: tuple[str, ...]
    """Every linear module (NF4 ones among them are checked and kept as they are)."""
    routers: tuple[str, ...] = ()
    """The MoE routers among `direction` and `magnitude_only` (`qdora.core.experts.AdaptedRouter`)."""
    left_out: tuple[str, ...] = ()
    """Linear modules `all-linear` names but that cannot take rank `r` (fewer rows or columns: a
    one-row gate such as Qwen2-MoE's `shared_expert_gate`), left frozen (`left_out_message`)."""

    def left_out_message(self) -> str | None:
        """One line naming what `all-linear` left out, or None."""
        if not self.left_out:
            return None
        more = f", ... ({len(self.left_out)} in all)" if len(self.left_out) > 4 else ""
        return (f"all-linear left {len(self.left_out)} linear module(s) frozen that cannot take r={self.cfg.r} "
                f"(fewer than r rows or columns): {', '.join(self.left_out[:4])}{more}; a smaller r adapts them")


def plan_adapters(model: nn.Module, cfg: AdapterConfig) -> AdapterPlan:
    """Check that `cfg` fits `model` and decide what `add_adapters` does (see `AdapterPlan`).
    Raises if a pattern matches nothing (listing the model's linear modules), if the model already
    has adapters, or if a layer cannot take the rank.

    The fused experts modules of an MoE that `cfg` targets or quantizes are held apart first
    (`qdora.models.moe.split_experts`: views, nothing copied; the forward is unchanged), so that their
    expert projections are linear layers here; on an error they are put back as they were."""
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"cfg must be a qdora.AdapterConfig, got {type(cfg).__name__}")
    split = {}
    if cfg.method != "full" and fused_experts(model):
        split = split_experts(model, lambda name: experts_needed(name, cfg))
    try:
        return _plan_adapters(model, cfg)
    except Exception:
        restore_experts(model, split)
        raise


def _plan_adapters(model: nn.Module, cfg: AdapterConfig) -> AdapterPlan:
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"cfg must be a qdora.AdapterConfig, got {type(cfg).__name__}")
    existing = [n for n, m in model.named_modules() if isinstance(m, QDoRALinear)]
    if existing or getattr(model, "qdora_config", None) is not None:
        raise ValueError(f"model already has qdora adapters ({len(existing)} layers, e.g. {existing[:3]}); "
                         "add_adapters must be applied once — start from the base model to change the config")
    linears = linear_module_names(model)
    quantized = [n for n in linears if isinstance(model.get_submodule(n), bnb.nn.Linear4bit)]
    if cfg.method == "full":
        if quantized:
            raise ValueError(f"method='full' cannot train NF4 weights ({len(quantized)} bnb.nn.Linear4bit layers, "
                             f"e.g. {quantized[0]}); load the model unquantized or use method='qdora'")
        return AdapterPlan(cfg, (), (), (), tuple(linears))

    problems: list[str] = []
    repacked = [n for n in quantized if is_repacked(model.get_submodule(n))]
    if repacked:
        problems.append(repacked_message(repacked))
    if quantized and not cfg.quantized:
        problems.append(f"the model has NF4 layers (e.g. {quantized[0]}) but method={cfg.method!r} "
                        f"expects an unquantized base; use method='q{cfg.method}'")
    mag_only = [n for n in linears if any(targets(model, n, p) for p in cfg.magnitude_only_modules)]
    gates = routers(model)
    mag_only += [n for n in gates if any(matches(n, p) for p in cfg.magnitude_only_modules)]
    # routers among the linears in module order: a streamed start draws A in the order a whole one does
    order = {name: i for i, (name, _) in enumerate(model.named_modules())} if gates else {}
    in_order = sorted([*linears, *gates], key=order.__getitem__) if gates else linears
    direction = [n for n in in_order if n not in mag_only and any(
        (matches if n in gates else lambda a, b: targets(model, a, b))(n, p) for p in cfg.target_modules
        if p not in ALL_LINEAR)]
    left_out: list[str] = []
    if any(p in ALL_LINEAR for p in cfg.target_modules):  # every linear layer but the head, as PEFT's all-linear
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = set(direction)  # named explicitly (routers among them): kept, and checked for the rank below
        wildcard = [n for n in linears if n not in chosen and n not in mag_only and expert_owner(n, model) is None
                    and model.get_submodule(n) is not head]
        # a layer only the wildcard names and that cannot take the rank (a one-row gate) is left out, and said
        left_out = [n for n in wildcard if cfg.direction == "lora" and cfg.r > _min_dim(model.get_submodule(n))]
        taken = chosen | set(wildcard).difference(left_out)
        direction = [n for n in in_order if n in taken]
    for pattern in (*cfg.target_modules, *cfg.magnitude_only_modules):
        if pattern in ALL_LINEAR:
            continue
        if not any(targets(model, n, pattern) for n in linears) and not any(matches(n, pattern) for n in gates):
            other = next(((n, m) for n, m in model.named_modules() if n and matches(n, pattern)), None)
            if pattern in _MLP_NAMES and (experts_of(model) or fused_experts(model)):
                problems.append(f"target {pattern!r} matches no linear module ({type(model).__name__}'s MLPs are "
                                "experts: target them as 'experts', 'experts.gate_up_proj' or 'experts.down_proj')")
                continue
            problems.append(f"target {pattern!r} matches no linear module"
                            + (f" ({type(model).__name__}: {other[0]} is a {type(other[1]).__name__}, not an "
                               "nn.Linear; qdora adapts nn.Linear layers)" if other else ""))
    if not direction and not mag_only and not problems:
        problems.append("no linear module matched")
    for name in direction if cfg.direction == "lora" else ():  # VeRA's shared rank may exceed a layer's
        out_f, in_f = gates[name].weight.shape if name in gates else (
            model.get_submodule(name).out_features, model.get_submodule(name).in_features)
        if cfg.r > min(in_f, out_f):  # named explicitly: an error, never a silent cap
            problems.append(f"r={cfg.r} exceeds {name} ({out_f}x{in_f}); "
                            f"use r <= {min(in_f, out_f)} or leave that module out")
    if cfg.direction == "vera" and any(n in gates for n in direction):
        first = next(n for n in direction if n in gates)
        problems.append(f"the VeRA direction is not supported on an MoE router ({first}); "
                        "leave the routers out of target_modules")
    if problems:
        msg = "cannot add adapters:\n  - " + "\n  - ".join(problems)
        if any("matches no" in p or "no linear" in p for p in problems):
            plain = [n for n in linears if expert_owner(n, model) is None]
            msg += f"\nthe model's linear modules: {_summarize(plain)}" + _experts_listing(model)
        raise ValueError(msg)
    adapted = set(direction + mag_only)
    kept = [n for n in linears if any(targets(model, n, p) for p in cfg.keep_full_precision)]
    frozen = [n for n in linears if n not in adapted and n not in kept]
    return AdapterPlan(cfg, tuple(direction), tuple(mag_only),
                       tuple(frozen) if cfg.quantized and cfg.quantize_frozen else (), tuple(linears),
                       tuple(n for n in direction + mag_only if n in gates), tuple(left_out))


def _min_dim(linear: nn.Module) -> int:
    return min(linear.in_features, linear.out_features)


def apply_adapters(model: nn.Module, plan: AdapterPlan, within=None, vera: VeRAProjections | None = None) -> None:
    """Carry out `plan` on the linear modules whose name satisfies `within(name)` (all when None).

    Layers are adapted in the model's module order, direction layers before magnitude-only ones
    (which draw no random numbers), so adapting a model part by part (`qdora.models.loading.stream_model`)
    draws the same initial `A` as adapting it at once. Does not freeze anything: the caller does."""
    cfg = plan.cfg
    keep = (lambda name: True) if within is None else within
    for name in plan.linears:
        if keep(name) and isinstance(model.get_submodule(name), bnb.nn.Linear4bit):
            # loaded NF4 layers (ours, or bitsandbytes'): standard layout, no bf16 repacking (see nf4.py)
            adopt_linear4bit(model.get_submodule(name), name)
    adapter_dtype = resolve_dtype(cfg.adapter_dtype)
    compute = cfg.compute_dtype if cfg.compute_dtype == "auto" else resolve_dtype(cfg.compute_dtype)
    for name in plan.direction + plan.magnitude_only:
        if not keep(name):
            continue
        base = model.get_submodule(name)
        router = None
        if name in plan.routers:  # an MoE router: full precision, its weight formed whole (AdaptedRouter)
            router, base = base, router_linear(base)
        elif cfg.quantized and not isinstance(base, bnb.nn.Linear4bit):
            base = linear4bit_from_linear(base, cfg.nf4_blocksize, cfg.double_quant, cfg.quant_storage)
        layer = QDoRALinear(base, r=0 if name in plan.magnitude_only else cfg.r, alpha=cfg.alpha,
                            dropout=cfg.dropout, use_dora=cfg.use_dora, norm=cfg.norm, use_rslora=cfg.use_rslora,
                            adapter_dtype=adapter_dtype, compute_dtype=compute,
                            block_rows=cfg.block_rows, eps=cfg.eps,
                            vera=vera if name in plan.direction else None, vera_d_init=cfg.vera_d_init)
        _set_submodule(model, name, layer if router is None else AdaptedRouter(router, layer))
    for name in plan.frozen:
        mod = model.get_submodule(name)
        if keep(name) and not isinstance(mod, bnb.nn.Linear4bit):
            _set_submodule(model, name, linear4bit_from_linear(mod, cfg.nf4_blocksize, cfg.double_quant,
                                                               cfg.quant_storage))
    for name in plan.linears:  # frozen NF4 layers bitsandbytes' CPU forward gets wrong: qdora's path
        if keep(name):
            exact_frozen_forward(model.get_submodule(name), cfg.block_rows)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_adapters(model: nn.Module, cfg: AdapterConfig, verbose: bool = True) -> nn.Module:
    """Adapt `model` in place as `cfg` says and return it.

    - `full`: every parameter trainable, nothing replaced (an NF4 model cannot be fully fine-tuned).
    - `lora`/`dora`: matched `nn.Linear` layers become `QDoRALinear` over the same weight.
    - `qlora`/`qdora`: matched `nn.Linear` layers are quantized to NF4 (explicitly) and wrapped;
      `bnb.nn.Linear4bit` layers (e.g. loaded with `BitsAndBytesConfig`) are adopted as they are;
      the other linear layers are quantized too (`quantize_frozen`), except `keep_full_precision`.
    Everything else is frozen. The model's `save_pretrained` then writes the adapter (as PEFT's
    does; `qdora.models.adapter_save.save_pretrained_adapter`). Raises if a pattern matches nothing
    (listing the model's linear modules), if the model already has adapters, or if a layer cannot
    take the rank.
    """
    plan = plan_adapters(model, cfg)
    for p in model.parameters():
        p.requires_grad_(cfg.method == "full")
    vera = None
    if cfg.direction == "vera" and plan.direction:
        shapes = [model.get_submodule(n) for n in plan.direction]
        device = next((p.device for p in shapes[0].parameters()), None)
        vera = VeRAProjections(cfg.r, max(m.in_features for m in shapes), max(m.out_features for m in shapes),
                               seed=cfg.projection_seed, device=device)
    apply_adapters(model, plan, vera=vera)
    if plan.left_out:
        warnings.warn(plan.left_out_message(), stacklevel=2)
    model.qdora_config = cfg
    if cfg.method != "full":
        route_save_pretrained(model)  # it writes the adapter, not the packed base
        attach_switches(model)  # model.disable_adapter(), disable_adapters(), enable_adapters()
    if verbose:
        print(param_report(model))
    return model
