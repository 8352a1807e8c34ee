"""Preference losses on sequence log-probabilities: FPO (focalized preference optimization) and DPO.

Pure tensor math: log-probs in, per-example losses and rewards out, so they are tested without a model.

With the implicit reward margin (Rafailov et al., DPO, 2023)

    h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x)),   p = sigmoid(beta * h)

FPO (Li et al., "LifeAlign", AAAI 2026, arXiv 2509.17183) puts a focal factor (Lin et al., 2017) on DPO's loss:

    L_FPO = -(1 - p)^gamma * log p

Pairs the model already ranks well (p near 1) get almost no gradient; gamma = 0 is exactly DPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceOutput:
    """Per-example results of a preference loss."""

    losses: torch.Tensor  # (batch,)
    chosen_rewards: torch.Tensor  # beta * (log pi(y_w|x) - log ref(y_w|x)), detached
    rejected_rewards: torch.Tensor  # beta * (log pi(y_l|x) - log ref(y_l|x)), detached
    margins: torch.Tensor  # h, detached (unscaled by beta)


def fpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    gamma: float = 2.0,
) -> PreferenceOutput:
    """Focalized preference loss ``-(1 - p)^gamma * log p`` with ``p = sigmoid(beta * h)``.

    Arguments are summed log-probabilities of each response, shape (batch,). ``log p`` is
    computed as ``logsigmoid`` and ``(1 - p)^gamma`` as ``exp(gamma * logsigmoid(-beta h))`` for numerical stability.
    """
    margins = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    logits = beta * margins
    losses = -F.logsigmoid(logits)
    if gamma != 0:
        # (1 - p)^gamma as exp(gamma * log sigmoid(-beta h)): finite gradients even where 1 - p underflows to 0
        losses = torch.exp(gamma * F.logsigmoid(-logits)) * losses
    return PreferenceOutput(
        losses=losses,
        chosen_rewards=(beta * (policy_chosen - ref_chosen)).detach(),
        rejected_rewards=(beta * (policy_rejected - ref_rejected)).detach(),
        margins=margins.detach(),
    )


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceOutput:
    """DPO's sigmoid loss ``-log sigmoid(beta * h)``: FPO with ``gamma = 0``."""
    return fpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, gamma=0.0)


def preference_loss(name: str, beta: float, gamma: float):
    """The loss a recipe names, as a function of the four log-prob tensors."""
    if name == "dpo":
        return lambda pc, pr, rc, rr: dpo_loss(pc, pr, rc, rr, beta=beta)
    if name == "fpo":
        return lambda pc, pr, rc, rr: fpo_loss(pc, pr, rc, rr, beta=beta, gamma=gamma)
    raise ValueError(f"unknown loss {name!r}; use fpo or dpo")


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (SFT warm-up on chosen responses)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
