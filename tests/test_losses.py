"""Tests for lifealign_lite.losses: FPO and DPO on hand-computed values, gradients, stability, SFT loss.

Expected values are computed independently with the math module from the formulas in the docstrings:
h = (pc - pr) - (rc - rr), p = 1 / (1 + exp(-beta h)), L_FPO = -(1 - p)^gamma * log p.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lifealign_lite.losses import PreferenceOutput, dpo_loss, fpo_loss, preference_loss, sft_loss

# (policy_chosen, policy_rejected, ref_chosen, ref_rejected) and the margin h they give
CASES = [
    ((-10.0, -12.0, -11.0, -11.0), 2.0),  # policy prefers y_w more than the reference
    ((-5.0, -4.0, -5.0, -5.0), -1.0),  # negative margin: policy moved towards y_l
    ((-20.0, -30.0, -22.0, -25.0), 7.0),  # easy pair
    ((-3.0, -3.0, -3.0, -3.0), 0.0),  # at initialisation policy == reference
]


def hand_fpo(h: float, beta: float, gamma: float) -> float:
    p = 1.0 / (1.0 + math.exp(-beta * h))
    return -((1.0 - p) ** gamma) * math.log(p)


def tensors(cases=CASES, dtype=torch.float64, requires_grad=False):
    cols = list(zip(*[c for c, _ in cases]))
    return [torch.tensor(col, dtype=dtype, requires_grad=requires_grad) for col in cols]


# ---------------------------------------------------------------------------
# values


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_fpo_matches_hand_computed_values(beta, gamma):
    out = fpo_loss(*tensors(), beta=beta, gamma=gamma)
    assert isinstance(out, PreferenceOutput)
    expected = [hand_fpo(h, beta, gamma) for _, h in CASES]
    assert out.losses.shape == (len(CASES),)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_fpo_spot_values_written_out():
    # h = 0: p = 1/2, loss = (1/2)^2 * log 2
    out = fpo_loss(*[torch.tensor([-3.0], dtype=torch.float64)] * 4, beta=0.1, gamma=2.0)
    assert out.losses.item() == pytest.approx(0.25 * math.log(2.0), rel=1e-12)
    # h = -1, beta = 0.1: p = 1/(1+e^0.1)
    p = 1.0 / (1.0 + math.exp(0.1))
    out = fpo_loss(*[torch.tensor([v], dtype=torch.float64) for v in (-5.0, -4.0, -5.0, -5.0)], beta=0.1, gamma=2.0)
    assert out.losses.item() == pytest.approx(-((1 - p) ** 2) * math.log(p), rel=1e-12)
    # a negative margin costs more than the mirrored positive one
    pos = fpo_loss(*[torch.tensor([v], dtype=torch.float64) for v in (-4.0, -5.0, -5.0, -5.0)], beta=0.1, gamma=2.0)
    assert out.losses.item() > pos.losses.item()


def test_fpo_loss_is_monotone_decreasing_in_margin():
    h = torch.linspace(-50, 50, 201, dtype=torch.float64)
    zero = torch.zeros_like(h)
    losses = fpo_loss(h, zero, zero, zero, beta=0.1, gamma=2.0).losses
    assert torch.all(losses[1:] < losses[:-1])
    assert torch.all(losses > 0)


def test_gamma_zero_is_exactly_dpo():
    args = tensors(dtype=torch.float32)
    fpo = fpo_loss(*args, beta=0.1, gamma=0.0)
    dpo = dpo_loss(*args, beta=0.1)
    assert torch.equal(fpo.losses, dpo.losses)
    h = torch.tensor([h for _, h in CASES], dtype=torch.float32)
    assert torch.equal(dpo.losses, -F.logsigmoid(0.1 * h))
    assert dpo.losses.tolist() == pytest.approx([math.log1p(math.exp(-0.1 * h)) for _, h in CASES], rel=1e-6)


def test_focal_factor_shrinks_loss_below_dpo():
    args = tensors()
    dpo = dpo_loss(*args, beta=0.1).losses
    fpo = fpo_loss(*args, beta=0.1, gamma=2.0).losses
    assert torch.all(fpo < dpo)
    # the ratio is exactly (1 - p)^gamma
    p = torch.sigmoid(0.1 * torch.tensor([h for _, h in CASES], dtype=torch.float64))
    assert torch.allclose(fpo / dpo, (1 - p) ** 2, rtol=1e-12)


def test_rewards_and_margins():
    pc, pr, rc, rr = tensors()
    beta = 0.3
    out = fpo_loss(pc, pr, rc, rr, beta=beta, gamma=2.0)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * (c[0] - c[2]) for c, _ in CASES], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([beta * (c[1] - c[3]) for c, _ in CASES], rel=1e-12)
    # margins are h itself, not scaled by beta
    assert out.margins.tolist() == pytest.approx([h for _, h in CASES], abs=1e-12)
    assert torch.allclose(out.chosen_rewards - out.rejected_rewards, beta * out.margins, rtol=1e-12)


def test_rewards_and_margins_are_detached_but_loss_has_grad():
    pc, pr, rc, rr = tensors(requires_grad=True)
    out = fpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1, gamma=2.0)
    assert out.losses.requires_grad
    for t in (out.chosen_rewards, out.rejected_rewards, out.margins):
        assert not t.requires_grad


def test_preference_loss_dispatch():
    args = tensors()
    assert torch.equal(preference_loss("fpo", 0.2, 2.0)(*args).losses, fpo_loss(*args, beta=0.2, gamma=2.0).losses)
    assert torch.equal(preference_loss("dpo", 0.2, 2.0)(*args).losses, dpo_loss(*args, beta=0.2).losses)
    with pytest.raises(ValueError, match="ipo"):
        preference_loss("ipo", 0.1, 2.0)


# ---------------------------------------------------------------------------
# gradients


def grad_wrt_h(h: float, beta: float, gamma: float) -> float:
    """d loss / d h by autograd through the library (h enters through policy_chosen with coefficient 1)."""
    pc = torch.tensor([h], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    fpo_loss(pc, zero, zero, zero, beta=beta, gamma=gamma).losses.sum().backward()
    return pc.grad.item()


def hand_grad(h: float, beta: float, gamma: float) -> float:
    # q = 1 - p; dL/dh = beta * q^gamma * (gamma * p * log p - q)
    p = 1.0 / (1.0 + math.exp(-beta * h))
    q = 1.0 - p
    return beta * q**gamma * (gamma * p * math.log(p) - q)


@pytest.mark.parametrize("h", [-30.0, -1.0, 0.0, 2.0, 40.0])
def test_gradient_matches_hand_derivative(h):
    assert grad_wrt_h(h, 0.1, 2.0) == pytest.approx(hand_grad(h, 0.1, 2.0), rel=1e-9, abs=1e-15)
    assert grad_wrt_h(h, 0.1, 0.0) == pytest.approx(-0.1 / (1 + math.exp(0.1 * h)), rel=1e-9)


def test_easy_pair_gets_far_less_gradient_than_under_dpo():
    h = 50.0  # beta h = 5, p ~ 0.993
    g_fpo, g_dpo = grad_wrt_h(h, 0.1, 2.0), grad_wrt_h(h, 0.1, 0.0)
    assert g_fpo < 0 and g_dpo < 0  # both push the margin up
    assert abs(g_fpo) < 0.01 * abs(g_dpo)
    p = 1 / (1 + math.exp(-5.0))
    q = 1 - p
    # FPO/DPO gradient ratio = q^(gamma-1) * (q - gamma p log p)
    assert g_fpo / g_dpo == pytest.approx(q * (q - 2 * p * math.log(p)), rel=1e-9)


def test_hard_pair_gradient_ratio():
    h = -20.0  # beta h = -2, p ~ 0.12: the model ranks y_l above y_w
    g_fpo, g_dpo = grad_wrt_h(h, 0.1, 2.0), grad_wrt_h(h, 0.1, 0.0)
    p = 1 / (1 + math.exp(2.0))
    q = 1 - p
    ratio = q * (q - 2 * p * math.log(p))
    assert g_fpo / g_dpo == pytest.approx(ratio, rel=1e-9)
    # a hard pair keeps (at least) DPO-sized gradient, unlike the easy one
    assert g_fpo / g_dpo > 1.0
    assert abs(grad_wrt_h(h, 0.1, 2.0)) > 100 * abs(grad_wrt_h(50.0, 0.1, 2.0))


# ---------------------------------------------------------------------------
# numerical stability


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.0])
def test_large_margins_are_finite(dtype, gamma):
    margins = [-1e5, -1e4, -500.0, 500.0, 1e4, 1e5]
    pc = torch.tensor(margins, dtype=dtype, requires_grad=True)
    zero = torch.zeros(len(margins), dtype=dtype)
    out = fpo_loss(pc, zero, zero, zero, beta=0.1, gamma=gamma)
    assert torch.isfinite(out.losses).all(), out.losses
    assert (out.losses >= 0).all()
    # huge positive margin: nothing left to learn; huge negative margin: loss ~ -beta h (linear, not inf)
    assert out.losses[-1].item() == pytest.approx(0.0, abs=1e-6)
    assert out.losses[0].float().item() == pytest.approx(1e4, rel=1e-2)
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all(), pc.grad


def test_fractional_gamma_gradient_is_finite_at_large_positive_margin():
    pc = torch.tensor([2000.0], requires_grad=True)
    zero = torch.zeros(1)
    fpo_loss(pc, zero, zero, zero, beta=0.1, gamma=0.5).losses.sum().backward()
    assert torch.isfinite(pc.grad).all(), pc.grad


# ---------------------------------------------------------------------------
# SFT loss


def test_sft_loss_ignores_minus_100_labels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 7, 8, -100, -100, -100]])
    # logits[:, t] predicts labels[:, t + 1]
    logp = torch.log_softmax(logits, dim=-1)
    terms = [-logp[b, t - 1, labels[b, t]].item() for b in range(2) for t in range(1, 6) if labels[b, t] != -100]
    assert len(terms) == 5
    assert sft_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)

    # changing logits at positions whose next label is ignored does not change the loss
    noise = torch.randn(2, 6, 11, generator=gen, dtype=torch.float64) * 10
    changed = logits.clone()
    for b, t in [(0, 0), (0, 4), (0, 5), (1, 3), (1, 4), (1, 5)]:  # next label is -100, or no next label
        changed[b, t] += noise[b, t]
    assert sft_loss(changed, labels).item() == pytest.approx(sft_loss(logits, labels).item(), rel=1e-12)
    # ... while changing a supervised position does
    changed[0, 1] += noise[0, 1]
    assert sft_loss(changed, labels).item() != pytest.approx(sft_loss(logits, labels).item(), rel=1e-6)


def test_sft_loss_gradient_is_zero_on_ignored_positions():
    logits = torch.randn(1, 5, 7, requires_grad=True)
    labels = torch.tensor([[-100, -100, 2, 3, -100]])
    sft_loss(logits, labels).backward()
    assert torch.all(logits.grad[0, [0, 3, 4]] == 0)
    assert torch.any(logits.grad[0, 1] != 0) and torch.any(logits.grad[0, 2] != 0)
