"""fp32 master copies for adapters stored in bf16, so that no optimizer step is rounded away.

An optimizer updates a parameter in place, in the parameter's dtype. In bf16 (8 bits of mantissa) a
step smaller than half the unit in the last place of the entry rounds back to the entry itself: the
first AdamW step at lr 2e-5 leaves 81% of a SmolLM2-sized `lora_A` unchanged (docs/peft-and-trainers.md).
`MasterWeights` wraps any optimizer: the wrapped optimizer updates an fp32 copy of every bf16/fp16
parameter, and after each step the parameter is set to its copy rounded to nearest. Every update
lands in the copy; the bf16 parameter is only the copy as the forward pass sees it.

    optimizer = qdora.MasterWeights(torch.optim.AdamW(model.parameters(), lr=2e-5))

The copies are part of `state_dict()` (as the per-parameter state `master_weight`), so a resumed run
continues from the copies, not from the rounded parameters. The wrapped optimizer's states
(AdamW's moments) are fp32 too, as they are for fp32 parameters: bf16 storage with this wrapper costs
2 bytes per adapter parameter *more* than fp32 storage (the copy, 4 bytes, minus the 2 bytes saved).
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
MASTER_KEY = "master_weight"


def needs_master_weights(params) -> bool:
    """Whether any trainable tensor in `params` is stored in bf16 or fp16."""
    return any(p.requires_grad and p.dtype in LOW_PRECISION for p in params)


class MasterWeights(torch.optim.Optimizer):
    """Wrap a new `optimizer` (no step taken yet): it then updates fp32 copies of its bf16/fp16
    parameters, which are set to their copies (rounded to nearest) after each step. fp32 parameters
    are left to it as they are. Learning-rate schedulers and `transformers.Trainer` see the wrapped
    optimizer's `param_groups` and `state`."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        if isinstance(optimizer, MasterWeights):
            raise ValueError("this optimizer already keeps master weights; wrap it once")
        if any(optimizer.state.values()):
            raise ValueError(f"{type(optimizer).__name__} has taken steps already; wrap it before its first step, "
                             "so that its states belong to the fp32 copies")
        self.optimizer = optimizer
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p.dtype in LOW_PRECISION:
                    master = p.detach().float().clone()
                    group["params"][i] = master
                    self.pairs.append((p, master))
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups  # the same dicts, not copies: a scheduler's lr reaches it
        self.state = optimizer.state

    def __repr__(self) -> str:
        return f"MasterWeights({self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        for p, master in self.pairs:
            p.copy_(master)
            master.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)
        for p, _ in self.pairs:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def _master_indices(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """state_dict() index -> (parameter, copy), in `torch.optim.Optimizer.state_dict`'s numbering."""
        by_id = {id(master): (p, master) for p, master in self.pairs}
        flat = [t for group in self.optimizer.param_groups for t in group["params"]]
        return {i: by_id[id(t)] for i, t in enumerate(flat) if id(t) in by_id}

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        per_param = dict(state["state"])
        for i, (_, master) in self._master_indices().items():
            per_param[i] = {**per_param.get(i, {}), MASTER_KEY: master.detach().clone()}
        return {**state, "state": per_param}

    def load_state_dict(self, state_dict: dict) -> None:
        per_param, copies = {}, {}
        for i, values in state_dict["state"].items():
            values = dict(values)
            if MASTER_KEY in values:
                copies[int(i)] = values.pop(MASTER_KEY)
            if values:
                per_param[i] = values
        with torch.no_grad():
            for i, (p, master) in self._master_indices().items():
                # a state without copies (written by a plain optimizer) starts from the parameters
                master.copy_(copies[i] if i in copies else p)
        self.optimizer.load_state_dict({**state_dict, "state": per_param})
        # torch's load_state_dict makes new group dicts and a new state: point at them again
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state
