"""Mixture-of-experts models: transformers' fused expert modules, held apart expert by expert.

transformers 5 stores the routed experts of an MoE layer (Qwen2/3-MoE, OLMoE, Mixtral and the models
that share their code) as one module with two 3-D parameters, `gate_up_proj (E, 2I, H)` and
`down_proj (E, H, I)`. bitsandbytes' 4-bit loading and PEFT's DoRA see only `nn.Linear` layers, so
they leave these (most of an MoE's weights) alone. `split_experts` replaces such a module with a
`qdora.core.experts.QDoRAExperts` whose expert projections are ordinary linear layers, views of the
fused weights (nothing is copied); the surgery then quantizes and adapts them as any linear layer.

Targets name expert projections as a PEFT user would: `experts` (both projections of every expert),
`experts.gate_up_proj`, `experts.down_proj` (or `mlp.experts...`, a full name, or a `re:` pattern on
`...experts.gate_up_proj.<e>`). A bare `gate_up_proj` or `down_proj` names linear layers only, so a
dense model's usual targets do not put adapters on every expert of an MoE.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from qdora.core.experts import PROJECTIONS, AdaptedRouter, QDoRAExperts

EXPERT_LINEAR = re.compile(r"^(?P<owner>.+)\.(?P<proj>gate_up_proj|down_proj)\.(?P<e>\d+)$")
"""The name of one expert's projection in a split model: `<experts module>.<projection>.<e>`."""

WAY_OUT = ("keep these experts out of target_modules and as loaded: keep_full_precision=('lm_head', 'experts') "
           "(qdora train: --keep-full-precision lm_head,experts)")
"""What a refused experts layout's message advises, as the library and the command line spell it."""

_LAYOUT_FLAGS = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
                 "has_post_expert_norm": False}
"""transformers' `use_experts_implementation` flags, and the values of the one layout held apart here."""


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module: 3-D expert parameters (or a class named `...Experts` carrying
    transformers' experts-implementation flags), not yet split."""
    if isinstance(module, QDoRAExperts):
        return False
    params = dict(module.named_parameters(recurse=False))
    if any(p.dim() == 3 for p in params.values()) and any("proj" in n for n in params):
        return True
    return type(module).__name__.endswith("Experts") and hasattr(module, "is_transposed")


def layout_problem(module: nn.Module) -> str | None:
    """Why `module` (a fused experts module) cannot be split, or None when it can."""
    for flag, wanted in _LAYOUT_FLAGS.items():
        if getattr(module, flag, wanted) != wanted:
            return f"{flag}={getattr(module, flag)!r}"
    params = dict(module.named_parameters(recurse=False))
    if set(params) != set(PROJECTIONS):
        return f"parameters {sorted(params)}, not {list(PROJECTIONS)}"
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0] or gate_up.shape[1] % 2 \
            or tuple(down.shape[1:]) != (gate_up.shape[2], gate_up.shape[1] // 2):
        return (f"shapes gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}, "
                "not (E, 2I, H) and (E, H, I)")
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate":
        return "its own gating function (_apply_gate)"
    if not isinstance(getattr(module, "act_fn", None), nn.Module) and not callable(getattr(module, "act_fn", None)):
        return "no act_fn"
    if not _standard_forward(type(module)):
        return "its own forward, not transformers' experts loop"
    return None


def _standard_forward(cls: type) -> bool:
    """Whether `cls.forward` is transformers' experts loop (`QDoRAExperts.forward` computes what it does):
    the same bytecode as Qwen3-MoE's, which 57 of transformers 5.25's experts classes share (Qwen2/3/3.5-MoE,
    OLMoE, Mixtral, DeepSeek-V2/V3, Gemma 4, GLM-4-MoE, ...)."""
    try:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # heavy, used here only
    except ImportError:  # no reference to compare with: the layout checks above decide
        return True
    mine = getattr(cls.forward, "__wrapped__", cls.forward).__code__
    ref = getattr(Qwen3MoeExperts.forward, "__wrapped__", Qwen3MoeExperts.forward).__code__
    return (mine.co_code, mine.co_names, mine.co_consts) == (ref.co_code, ref.co_names, ref.co_consts)


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every fused experts module of `model`, by name."""
    return {name: mod for name, mod in model.named_modules() if name and is_fused_experts(mod)}


def split_module(module: nn.Module) -> QDoRAExperts:
    """`module`'s experts held apart: per expert, `nn.Linear` layers whose weights are views of the
    fused parameters (on the meta device for a model built there). Raises, naming the class, for a
    layout other than transformers' concatenated, untransposed, bias-free one."""
    problem = layout_problem(module)
    if problem is not None:
        raise ValueError(f"{type(module).__name__}: an experts layout qdora does not handle ({problem}); "
                         + WAY_OUT)
    layers = {}
    for proj in PROJECTIONS:
        fused = getattr(module, proj)
        out_f, in_f = fused.shape[1], fused.shape[2]
        layers[proj] = []
        for e in range(fused.shape[0]):
            with torch.device("meta"):
                linear = nn.Linear(in_f, out_f, bias=False, dtype=fused.dtype)
            linear.weight = nn.Parameter(fused.data[e], requires_grad=False)
            layers[proj].append(linear)
    return QDoRAExperts(layers["gate_up_proj"], layers["down_proj"], module.act_fn, type(module).__name__)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def split_experts(model: nn.Module, wanted=lambda name: True) -> dict[str, nn.Module]:
    """Replace every fused experts module whose name satisfies `wanted` by its `split_module`; returns
    the replaced modules by name (for `restore_experts`). Every layout is checked before any change."""
    found = {name: mod for name, mod in fused_experts(model).items() if wanted(name)}
    problems = [f"{name} ({type(mod).__name__}: {problem})" for name, mod in found.items()
                if (problem := layout_problem(mod)) is not None]
    if problems:
        raise ValueError(f"experts layout not handled: {problems[0]}"
                         + (f" and {len(problems) - 1} more" if len(problems) > 1 else "")
                         + "; " + WAY_OUT)
    for name, mod in found.items():
        set_submodule(model, name, split_module(mod))
    return found


def restore_experts(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Undo `split_experts` (the fused modules back in place)."""
    for name, mod in originals.items():
        set_submodule(model, name, mod)


def expert_owner(name: str, model: nn.Module) -> tuple[str, str] | None:
    """`(experts module name, projection)` when `name` is one expert's projection in a split model."""
    found = EXPERT_LINEAR.match(name)
    if found is None or not isinstance(_submodule(model, found["owner"]), QDoRAExperts):
        return None
    return found["owner"], found["proj"]


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def names_expert(pattern: str) -> bool:
    """Whether a target pattern may name expert projections (`experts`, `experts.down_proj`, a `re:`
    pattern...): a bare projection name (`down_proj`) names linear layers only."""
    return pattern.startswith("re:") or "." in pattern or pattern == "experts" or pattern.endswith("experts")


def expert_matches(name: str, owner: str, proj: str, pattern: str, matches) -> bool:
    """Whether `pattern` targets expert projection `name` (of experts module `owner`, projection `proj`)."""
    if pattern.startswith("re:"):
        return matches(name, pattern) or matches(f"{owner}.{proj}", pattern) or matches(owner, pattern)
    return matches(owner, pattern) or (names_expert(pattern) and matches(f"{owner}.{proj}", pattern)) \
        or matches(name, pattern)


def experts_of(model: nn.Module) -> dict[str, QDoRAExperts]:
    """Every split experts module of `model`, by name."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QDoRAExperts)}


def expert_count(model: nn.Module) -> int | None:
    """The number of routed experts per MoE layer (None for a dense model)."""
    counts = {m.num_experts for m in experts_of(model).values()}
    counts |= {getattr(m, proj).shape[0] for m in fused_experts(model).values() for proj in PROJECTIONS
               if isinstance(getattr(m, proj, None), torch.Tensor)}
    return max(counts) if counts else None


_SOURCE = re.compile(r"^(?P<owner>.+)\.(?:(?P<fused>gate_up_proj|down_proj)"
                     r"|(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight)$")
_OLD_NAMES = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
              "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", None), "w2": ("down_proj", None)}
"""The per-expert checkpoint names (Qwen/OLMoE's, Mixtral's) and where each goes in the fused layout:
the projection, and for `gate_up_proj` which half (gate rows first)."""


def expert_source(key: str, model: nn.Module) -> tuple[str, str, int | None, int | None] | None:
    """Where checkpoint tensor `key` (already renamed as transformers renames on load) goes in an
    experts module of `model`: `(experts module, projection, expert or None for the fused 3-D tensor,
    half of gate_up or None)`, or None when `key` is not an expert weight of `model`."""
    found = _SOURCE.match(key)
    owner = None if found is None else _submodule(model, found["owner"])
    if owner is None or not (isinstance(owner, QDoRAExperts) or is_fused_experts(owner)):
        return None
    if found["fused"]:
        return found["owner"], found["fused"], None, None
    proj, half = _OLD_NAMES[found["proj"]]
    return found["owner"], proj, int(found["e"]), half


def fuse_expert(model: nn.Module, source: tuple[str, str, int | None, int | None], tensor: torch.Tensor,
                filled: dict[str, int]) -> None:
    """Copy an expert tensor (`expert_source`'s `source`) into the fused parameter of a module kept
    fused (`method='full'`), materializing the parameter from the meta device on its first expert in
    `tensor`'s dtype and device; `filled` counts the per-expert tensors each parameter got."""
    owner_name, proj, expert, half = source
    owner = model.get_submodule(owner_name)
    fused = getattr(owner, proj)
    if expert is None:
        setattr(owner, proj, nn.Parameter(tensor.clone(), requires_grad=False))
        return
    if fused.device.type == "meta":
        fused = nn.Parameter(torch.empty(fused.shape, dtype=tensor.dtype, device=tensor.device), requires_grad=False)
        setattr(owner, proj, fused)
    rows = fused.shape[1] // 2
    target = fused.data[expert] if half is None else fused.data[expert, half * rows:(half + 1) * rows]
    target.copy_(tensor)
    key = f"{owner_name}.{proj}"
    filled[key] = filled.get(key, 0) + 1


def missing_experts(model: nn.Module, halves: dict[tuple[str, int], list], filled: dict[str, int]) -> list[str]:
    """What a per-expert checkpoint left out: an expert's gate rows without its up rows (`halves`, as the
    loader holds them) or a fused parameter not filled by every expert (`filled`, see `fuse_expert`)."""
    problems = [f"{owner}: expert {e} has its {'gate' if pair[0] is not None else 'up'} rows but not its "
                f"{'up' if pair[0] is not None else 'gate'} rows" for (owner, e), pair in halves.items()]
    for key, count in filled.items():
        owner_name, _, proj = key.rpartition(".")
        wanted = getattr(model.get_submodule(owner_name), proj).shape[0] * (2 if proj == "gate_up_proj" else 1)
        if count != wanted:
            problems.append(f"{key}: {count} of its {wanted} per-expert tensors are in the checkpoint")
    return problems


def peft_expert_tensors(layers: dict, model: nn.Module, value) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The expert adapters of `layers` (name -> `QDoRALinear`) in PEFT's `target_parameters` layout: per
    experts module and projection, `lora_A` `(E·r, in)` (expert e's `A` in rows `e·r:(e+1)·r`) and
    `lora_B` `(out, E·r)` (expert e's column j of `B` at `j·E + e`), under `<experts>.lora_A.weight`, or
    `<experts>.base_layer.lora_A.weight` for `gate_up_proj` when both projections are adapted (PEFT
    nests one wrapper per parameter, the first listed innermost). `value(name, layer, attr)` reads a
    tensor. Returns `(tensors, target_parameters)`; raises where PEFT cannot express the adapter."""
    groups: dict[str, dict[str, dict[int, str]]] = {}
    for name in layers:
        owner = expert_owner(name, model)
        if owner is not None:
            groups.setdefault(owner[0], {}).setdefault(owner[1], {})[int(name.rpartition(".")[2])] = name
    if not groups:
        return {}, []
    if any(layers[n].use_dora for g in groups.values() for p in g.values() for n in p.values()):
        raise ValueError("PEFT cannot express DoRA on an MoE's experts (its target_parameters take LoRA only); "
                         "save with format='qdora'")
    projs = sorted({p for g in groups.values() for p in g}, key=PROJECTIONS.index)
    tensors = {}
    for owner, group in groups.items():
        experts = model.get_submodule(owner).num_experts
        for proj in projs:
            names = group.get(proj, {})
            if sorted(names) != list(range(experts)) or set(group) != set(projs):
                raise ValueError(f"PEFT's target_parameters adapt every expert of every experts module alike; {owner}."
                                 f"{proj} has {len(names)} of {experts} experts adapted; save with format='qdora'")
            A = torch.cat([value(names[e], layers[names[e]], "lora_A") for e in range(experts)])
            B = torch.stack([value(names[e], layers[names[e]], "lora_B") for e in range(experts)])  # (E, out, r)
            where = f"{owner}.base_layer" if proj == "gate_up_proj" and len(projs) == 2 else owner
            tensors[f"{where}.lora_A.weight"] = A.contiguous()
            tensors[f"{where}.lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], -1).contiguous()
    return tensors, [f"experts.{p}" for p in projs]


def experts_from_peft(modules: dict[str, dict[str, torch.Tensor]], target_parameters: list[str],
                      r: int) -> dict[str, dict[str, torch.Tensor]]:
    """`peft_expert_tensors` undone on a PEFT file's modules (name -> {lora_A, lora_B}): each experts
    module's entries become one entry per expert projection (`<experts>.<projection>.<e>`)."""
    projs = [p.rpartition(".")[2] for p in target_parameters]
    if any(p not in PROJECTIONS for p in projs):
        raise ValueError(f"target_parameters {target_parameters}: only {['experts.' + p for p in PROJECTIONS]} "
                         "can be loaded")
    out = {}
    for name, tensors in modules.items():
        owner, proj = name, None
        if name.endswith(".base_layer") and len(projs) == 2:
            owner, proj = name.removesuffix(".base_layer"), projs[0]
        elif owner.endswith("experts") and projs:
            proj = projs[-1]
        if proj is None or set(tensors) != {"lora_A", "lora_B"}:
            out[name] = tensors
            continue
        A, B = tensors["lora_A"], tensors["lora_B"]
        experts = A.shape[0] // r
        B = B.reshape(B.shape[0], r, experts).permute(2, 0, 1)
        for e in range(experts):
            out[f"{owner}.{proj}.{e}"] = {"lora_A": A[e * r:(e + 1) * r].contiguous(), "lora_B": B[e].contiguous()}
    return out


def file_expert_count(names) -> int | None:
    """The number of experts per MoE layer an adapter file's module names imply (None: no expert)."""
    found = [EXPERT_LINEAR.match(name) for name in names]
    return max((int(f["e"]) + 1 for f in found if f is not None), default=None)


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """The routers of an MoE's layers, by name: beside each experts module, the module (not a linear
    layer) with a `weight` of shape `(E, H)` (transformers 5's `...TopKRouter`, Gemma 4's `router`);
    an already adapted one (`AdaptedRouter`) too."""
    found = {}
    for name, experts in {**fused_experts(model), **experts_of(model)}.items():
        count = experts.num_experts if isinstance(experts, QDoRAExperts) else getattr(experts, PROJECTIONS[0]).shape[0]
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        for child_name, child in parent.named_children():
            weight = getattr(child, "weight", None)
            if isinstance(child, AdaptedRouter) or (
                    not isinstance(child, nn.Linear) and isinstance(weight, nn.Parameter) and weight.dim() == 2
                    and weight.shape[0] == count and child is not experts):
                found[f"{parent_name}.{child_name}" if parent_name else child_name] = child
    return found


def router_linear(router: nn.Module) -> nn.Linear:
    """An `nn.Linear` sharing `router`'s weight (what a `QDoRALinear` adapts)."""
    out_f, in_f = router.weight.shape
    with torch.device("meta"):
        linear = nn.Linear(in_f, out_f, bias=False, dtype=router.weight.dtype)
    linear.weight = router.weight
    return linear
