"""`QDoRAExperts`: the routed experts of one mixture-of-experts layer, held apart expert by expert.

transformers 5 stores an MoE layer's experts fused, as 3-D parameters `gate_up_proj (E, 2I, H)` and
`down_proj (E, H, I)`. Here expert `e`'s projections are two linear modules, `gate_up_proj[e]`
(`2I × H`) and `down_proj[e]` (`H × I`): each a frozen `nn.Linear` or NF4 `bnb.nn.Linear4bit` (its
own NF4 blocks), or a `QDoRALinear` over one with its own `m`, `A`, `B`. The forward is transformers'
(`gate, up = x·W_guᵀ` split in halves, `act(gate)·up`, then `W_down`, weighted by the router and
summed over the top-k experts), run only for the experts the batch routes tokens to: an expert no
token chose is neither dequantized nor computed.

In training, an unrouted expert's trainable tensors still get a gradient, of zeros (as a fused 3-D
adapter does in every implementation that computes experts together), so every process steps the
same tensors: optimizers, gradient clipping and FSDP's reduce-scatter see the same set whichever
experts a micro-batch happens to reach.
"""

from __future__ import annotations

import torch
from torch import nn

PROJECTIONS = ("gate_up_proj", "down_proj")
"""The expert projections, as transformers 5 names its fused parameters."""


class QDoRAExperts(nn.Module):
    """The experts of one MoE layer, one linear module per expert and projection.

    Args:
        gate_up: `E` modules `(2I × H)`: the gate rows first, then the up rows.
        down: `E` modules `(H × I)`.
        act_fn: the activation applied to the gate half.
        source: the class name of the fused module it replaces (error messages, exports).

    `forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))` as transformers' experts
    modules; an index outside `[0, E)` (expert parallelism's "not here") is skipped, as there.
    """

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], act_fn: nn.Module, source: str = ""):
        super().__init__()
        if not gate_up or len(gate_up) != len(down):
            raise ValueError(f"QDoRAExperts needs as many gate_up as down modules, got {len(gate_up)} and {len(down)}")
        self.gate_up_proj = nn.ModuleList(gate_up)
        self.down_proj = nn.ModuleList(down)
        self.act_fn = act_fn
        self.source = source
        self.num_experts = len(gate_up)
        self.hidden_dim = gate_up[0].in_features
        self.intermediate_dim = gate_up[0].out_features // 2
        bad = [e for e in range(self.num_experts)
               if (gate_up[e].out_features, gate_up[e].in_features) != (2 * self.intermediate_dim, self.hidden_dim)
               or (down[e].out_features, down[e].in_features) != (self.hidden_dim, self.intermediate_dim)]
        if bad or gate_up[0].out_features % 2:
            raise ValueError(f"QDoRAExperts: expert {bad[0] if bad else 0} does not have the shapes gate_up "
                             f"({2 * self.intermediate_dim}, {self.hidden_dim}) and down "
                             f"({self.hidden_dim}, {self.intermediate_dim})")

    def routed(self, top_k_index: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor, list[int]]:
        """`(experts, token, slot, bounds)`: the experts that get tokens (ascending), and for the
        (token, slot) pairs sorted by expert, their token and top-k slot; expert `experts[i]` takes
        pairs `bounds[i]:bounds[i + 1]`. One host synchronization (the counts)."""
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        valid = (flat >= 0) & (flat < self.num_experts)
        order = torch.where(valid, flat, self.num_experts).argsort(stable=True)
        counts = torch.bincount(flat[valid], minlength=self.num_experts).tolist()
        experts = [e for e, c in enumerate(counts) if c]
        bounds = [0]
        for e in experts:
            bounds.append(bounds[-1] + counts[e])
        order = order[:bounds[-1]]
        return experts, order // k, order % k, bounds

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-1] != self.hidden_dim:
            raise ValueError(f"experts input has {hidden_states.shape[-1]} features, "
                             f"the experts expect {self.hidden_dim}")
        out = torch.zeros_like(hidden_states)
        experts, token, slot, bounds = self.routed(top_k_index)
        for i, e in enumerate(experts):
            tok, pos = token[bounds[i]:bounds[i + 1]], slot[bounds[i]:bounds[i + 1]]
            gate, up = self.gate_up_proj[e](hidden_states[tok]).chunk(2, dim=-1)
            h = self.down_proj[e](self.act_fn(gate) * up)
            h = h * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, h.to(out.dtype))
        if self.training and torch.is_grad_enabled():
            hit = set(experts)
            idle = [p for e in range(self.num_experts) if e not in hit
                    for module in (self.gate_up_proj[e], self.down_proj[e])
                    for p in module.parameters() if p.requires_grad]
            if idle:  # zero gradients for the experts no token chose (see the module docstring)
                out = out + 0.0 * torch.stack([p.sum().to(out.dtype) for p in idle]).sum()
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"
                + (f", from {self.source}" if self.source else ""))


class AdaptedRouter(nn.Module):
    """An MoE router whose logits' weight `(E × H)` carries an adapter.

    transformers 5's routers are not linear layers: a module with a `weight` parameter whose forward
    computes `F.linear(x, weight)` and then the model's own top-k rule (softmax, normalisation,
    bias corrections). `adapter` is a `QDoRALinear` over an `nn.Linear` sharing that weight; the
    forward builds the adapted weight `W' = (m / ||W0 + s·B·A||) ⊙ (W0 + s·B·A)` (LoRA: `W0 + s·B·A`),
    at `E × H` small enough to form whole, and runs the router's own forward with it
    (`torch.func.functional_call`), so every routing rule is kept as the model wrote it. The adapter's
    dropout does not apply here (the weight is formed, not applied to a dropped-out input).
    """

    def __init__(self, router: nn.Module, adapter: nn.Module):
        super().__init__()
        self.router = router
        self.adapter = adapter

    def effective_weight(self) -> torch.Tensor:
        """`W'` in the router weight's dtype, differentiable in the adapter's tensors."""
        adapter = self.adapter
        weight = adapter.base_layer.weight
        V = weight.float()
        A, B = adapter.direction_factors()
        if A is not None:
            V = V + adapter.scaling * (B.float() @ A.float())
        if adapter.use_dora:
            # rowsum(V²) as the layer's base_row_sq_norm was computed: at step 0 (B = 0) m / n is exactly 1
            n = V.pow(2).sum(1).sqrt()
            n = n if adapter.norm == "exact" else n.detach()
            V = V * (adapter.magnitude / n.clamp_min(adapter.eps))[:, None]
        return V.to(weight.dtype)

    def forward(self, *args, **kwargs):
        if self.adapter.disabled:  # the adapters switched off: the router as it was
            return self.router(*args, **kwargs)
        return torch.func.functional_call(self.router, {"weight": self.effective_weight()}, args, kwargs)
