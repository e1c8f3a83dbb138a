r"""Preference objectives on per-sequence log-probabilities: DPO (its `sigmoid` and `ipo` losses) and SimPO.

Notation, per pair (a prompt `x`, a chosen reply `y_w`, a rejected one `y_l`):

    π_w = Σ_t log π_θ(y_w,t | x, y_w,<t)     the policy's log-probability of the chosen reply (its tokens only)
    r_w = the same under the reference (the model before fine-tuning: a qdora model with its adapters off)
    n_w = the chosen reply's token count;   π_l, r_l, n_l likewise for the rejected reply
    Δ   = (π_w − r_w) − (π_l − r_l)

    DPO, sigmoid (Rafailov et al. 2023):  L = −log σ(β·Δ)
    DPO, ipo (Azar et al. 2023):          L = ((π_w − r_w)/n_w − (π_l − r_l)/n_l − 1/(2β))²   (per token, as TRL)
    SimPO (Meng et al. 2024):             L = −log σ(β·(π_w/n_w − π_l/n_l) − γ)                (no reference)

The rewards reported are β·(π_w − r_w) and β·(π_l − r_l) (SimPO: β·π_w/n_w and β·π_l/n_l); the loss of a
batch is the mean over its pairs. At a policy equal to its reference every DPO reward is 0 and the sigmoid
loss is log 2. These are TRL's `DPOTrainer` formulas (loss types `sigmoid` and `ipo`), checked against it in
`tests/test_preference.py`; SimPO is TRL's CPO `simpo` loss without its NLL term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("sft", "dpo", "simpo")
"""`sft`: supervised (the default); `dpo`: against a reference; `simpo`: reference-free."""
DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class PreferenceLoss:
    """Per-pair losses and rewards of a batch (`loss` is their mean)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def metrics(self) -> dict[str, float]:
        """Mean rewards, margin and reward accuracy (the share of pairs whose chosen reward is higher)."""
        c, r = self.chosen_rewards.detach().float(), self.rejected_rewards.detach().float()
        return {"rewards/chosen": c.mean().item(), "rewards/rejected": r.mean().item(),
                "rewards/margins": (c - r).mean().item(), "rewards/accuracies": (c > r).float().mean().item()}


def check_beta(beta, name: str = "beta") -> float:
    """`beta` as a float > 0, or a one-line ValueError naming it."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or beta != beta:
        raise ValueError(f"{name}={beta!r} must be a number > 0 (typical: DPO 0.1, SimPO 2.0)")
    return float(beta)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> PreferenceLoss:
    """DPO's loss of each pair from the log-probabilities of its replies (see the module docstring).
    `chosen_tokens`/`rejected_tokens` (the replies' token counts) are needed by `ipo`."""
    beta = check_beta(beta)
    chosen_ratio = policy_chosen - ref_chosen.to(policy_chosen)
    rejected_ratio = policy_rejected - ref_rejected.to(policy_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the replies' token counts (chosen_tokens, rejected_tokens)")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r} is unknown; use one of {', '.join(DPO_LOSSES)}")
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def check_gamma(gamma, name: str = "simpo_gamma") -> float:
    """`gamma` as a float >= 0, or a one-line ValueError naming it."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma != gamma or gamma < 0:
        raise ValueError(f"{name}={gamma!r} must be a number >= 0 (typical: 0.5 to 1.5)")
    return float(gamma)


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, gamma: float) -> PreferenceLoss:
    """SimPO's loss of each pair: length-normalized log-probabilities, a target margin `gamma`, no reference."""
    beta, gamma = check_beta(beta), check_gamma(gamma)
    chosen = policy_chosen / chosen_tokens.clamp(min=1)
    rejected = policy_rejected / rejected_tokens.clamp(min=1)
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach())
