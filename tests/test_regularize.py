"""Tests for the EWC and O-LoRA baselines (lifealign_lite.regularize and their use in align), on the tiny Llama.

The Fisher collected by hooks is checked against autograd on the base weights themselves; the penalties
against their definitions; and two tasks aligned in a row check that the bank carries the Fisher and the
history the second task is penalized with.
"""

from __future__ import annotations

import json

import pytest
import torch

from lifealign_lite.align import align
from lifealign_lite.losses import preference_loss
from lifealign_lite.memory.bank import Bank
from lifealign_lite.memory.consolidate import LowRank
from lifealign_lite.model import SHORT, attach_adapters
from lifealign_lite.recipe import RecipeError
from lifealign_lite.regularize import (
    accumulate_fisher,
    combine,
    ewc_penalty,
    fisher_diagonal,
    lora_layers,
    olora_penalty,
    subspace_bases,
)
from lifealign_lite.train import pair_logps, reference_logps, train_short_term

from test_train import items, tiny_align, tiny_recipe  # noqa: F401  (fixtures shared with test_train)

pytestmark = pytest.mark.usefixtures("single_thread")


def _perturb_short(model, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{SHORT}." in n and "lora_B" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def test_lora_layers_are_named_like_the_bank(tiny_base):
    model = attach_adapters(tiny_base, tiny_recipe())
    names = sorted(lora_layers(model))
    assert names == sorted(f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj"))


def test_fisher_matches_autograd_on_the_base_weights(tiny_base, items):
    """The hooks' g^T x equals the gradient of the weight itself, squared and averaged over pairs."""
    recipe = tiny_recipe()
    model = attach_adapters(tiny_base, recipe)
    _perturb_short(model)  # away from the reference, so the loss has a gradient
    pad = tiny_base.tokenizer.pad_token_id
    few = items[:3]
    ref = reference_logps(model, few, pad, "cpu")
    loss_fn = preference_loss("dpo", recipe.beta, 0.0)
    fisher = fisher_diagonal(model, few, ref, loss_fn, pad, "cpu")

    layers = lora_layers(model)
    weights = {n: m.base_layer.weight for n, m in layers.items()}
    expected = {n: torch.zeros_like(w) for n, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    for i, item in enumerate(few):
        pc, pr, _, _ = pair_logps(model, [item], pad, "cpu")
        loss = loss_fn(pc, pr, ref["chosen"][[i]], ref["rejected"][[i]]).losses.sum()
        grads = torch.autograd.grad(loss, list(weights.values()))
        for (n, _), g in zip(weights.items(), grads):
            expected[n] += g.square() / len(few)
    assert set(fisher) == set(expected)
    for n in fisher:
        assert fisher[n].shape == expected[n].shape
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-10)
    assert sum(f.sum() for f in fisher.values()) > 0
    assert all(p.grad is None for n, p in model.named_parameters() if f".{SHORT}." in n)  # no gradient left behind


def test_accumulate_fisher_scales_each_task_to_mean_one():
    a = {"m": torch.tensor([[1.0, 3.0]])}
    b = {"m": torch.tensor([[10.0, 30.0]])}
    acc = accumulate_fisher({}, a)
    torch.testing.assert_close(acc["m"], torch.tensor([[0.5, 1.5]]))
    acc2 = accumulate_fisher(acc, b)  # b has the same shape of importance: it adds the same, not 10x more
    torch.testing.assert_close(acc2["m"], torch.tensor([[1.0, 3.0]]))
    assert accumulate_fisher({}, {"m": torch.zeros(1, 2)})["m"].sum() == 0


def test_ewc_penalty_is_the_fisher_weighted_square_of_the_short_update(tiny_base):
    model = attach_adapters(tiny_base, tiny_recipe())
    layers = lora_layers(model)
    fisher = {n: torch.rand(m.out_features, m.in_features, generator=torch.Generator().manual_seed(1)) for n, m in layers.items()}
    pen = ewc_penalty(model, fisher, lam=3.0)
    assert pen().item() == 0.0  # B starts at zero: nothing moved yet
    _perturb_short(model)
    expected = sum((fisher[n] * (m.scaling[SHORT] * m.lora_B[SHORT].weight @ m.lora_A[SHORT].weight).square()).sum()
                   for n, m in layers.items())
    value = pen()
    torch.testing.assert_close(value, 3.0 * expected)
    value.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


def test_ewc_penalty_refuses_a_fisher_for_other_modules(tiny_base):
    model = attach_adapters(tiny_base, tiny_recipe())
    with pytest.raises(ValueError, match="no entry"):
        ewc_penalty(model, {"model.layers.0.self_attn.q_proj": torch.zeros(32, 32)}, 1.0)


def test_subspace_bases_are_orthonormal_and_span_every_earlier_A():
    g = torch.Generator().manual_seed(0)
    a1, a2 = torch.randn(3, 10, generator=g), torch.randn(2, 10, generator=g)
    history = [{"m": LowRank(torch.randn(4, 3, generator=g), a1)}, {"m": LowRank(torch.randn(4, 2, generator=g), a2)},
               {"m": LowRank(torch.zeros(4, 0), torch.zeros(0, 10))}]
    q = subspace_bases(history)["m"]
    assert q.shape == (10, 5)
    torch.testing.assert_close(q.T @ q, torch.eye(5), atol=1e-5, rtol=0)
    for a in (a1, a2):
        torch.testing.assert_close(a @ q @ q.T, a, atol=1e-5, rtol=1e-5)  # every earlier row lies in the span
    dup = subspace_bases([{"m": LowRank(torch.ones(4, 2), torch.stack([a1[0], 2 * a1[0]]))}])["m"]
    assert dup.shape == (10, 1)  # a rank-deficient A gives only its real directions


def test_olora_penalty_is_zero_outside_and_positive_inside_the_old_subspaces(tiny_base):
    model = attach_adapters(tiny_base, tiny_recipe())
    layers = lora_layers(model)
    name, layer = next(iter(layers.items()))
    a = layer.lora_A[SHORT].weight.detach()
    inside = {name: torch.linalg.qr(a.T)[0]}  # the short adapter's own rows: all its energy is inside
    torch.testing.assert_close(olora_penalty(model, inside, 2.0)(), 2.0 * a.square().sum(), rtol=1e-4, atol=1e-6)
    null = torch.linalg.svd(a, full_matrices=True)[2][a.shape[0]:]  # directions orthogonal to every row of A
    outside = {name: null[:2].T.contiguous()}
    assert olora_penalty(model, outside, 2.0)().item() == pytest.approx(0.0, abs=1e-8)
    assert olora_penalty(model, {}, 2.0)().item() == 0.0


def test_combine_sums_penalties_and_is_none_without_any():
    assert combine(None, None) is None
    f = combine(lambda: torch.tensor(1.5), None, lambda: torch.tensor(2.0))
    assert f().item() == 3.5


def test_a_strong_olora_penalty_keeps_training_out_of_the_old_subspace(tiny_base_factory, items, tmp_path):
    """Trained with and without the penalty from the same start, the penalized A ends with less energy inside."""
    energies = []
    for lam in (0.0, 50.0):
        recipe = tiny_recipe(max_steps=10, lr=2e-2)
        torch.manual_seed(0)
        base = tiny_base_factory()
        model = attach_adapters(base, recipe)
        layers = lora_layers(model)
        bases = {n: torch.eye(m.in_features)[:, :8].contiguous() for n, m in layers.items()}  # "old" subspace: 8 coordinates
        reg = olora_penalty(model, bases, lam) if lam else None
        st = train_short_term(model, base.tokenizer, items, recipe, "cpu", tmp_path / f"ck{lam}", regularizer=reg)
        energies.append(sum((m.lora_A[SHORT].weight.detach() @ bases[n]).square().sum().item() for n, m in layers.items()))
        if lam:
            assert all("reg" in h for h in st.history) and st.history[-1]["reg"] < st.history[0]["reg"]
    assert energies[1] < 0.5 * energies[0]


def test_recipe_refuses_negative_penalties():
    for key in ("ewc_lambda", "olora_lambda"):
        with pytest.raises(RecipeError, match=key):
            tiny_recipe(**{key: -1.0})


def test_two_tasks_with_ewc_and_olora_carry_fisher_and_penalize_the_second(tiny_align, tmp_path):
    recipe = tiny_recipe(max_steps=3, ewc_lambda=100.0, olora_lambda=1.0, tau=1.0, projection_gamma=1.0, bank_rank=8)
    bank = Bank(tmp_path / "bank")
    first = align(tiny_align, recipe, tmp_path / "home", bank.root, domain="one")
    assert first.summary["penalty_end"] is None  # nothing earlier to protect
    f1 = bank.load(1).fisher()
    assert f1 and sum(f.numel() for f in f1.values()) == pytest.approx(sum(f.sum().item() for f in f1.values()), rel=1e-4)  # mean 1
    second = align(tiny_align, recipe, tmp_path / "home", bank.root, domain="two")
    assert second.summary["penalty_start"] > 0  # O-LoRA: the fresh A overlaps the first task's subspace
    assert second.summary["penalty_end"] is not None
    f2 = bank.load(2).fisher()
    mean2 = sum(f.sum().item() for f in f2.values()) / sum(f.numel() for f in f2.values())
    assert mean2 == pytest.approx(2.0, rel=1e-4)  # two tasks, each scaled to mean 1
    assert bank.load(1).fisher().keys() == f1.keys()  # the earlier version keeps its own Fisher
    assert json.loads((second.run_dir / "summary.json").read_text())["recipe"]["ewc_lambda"] == 100.0


def test_without_penalties_no_fisher_is_written(tiny_align, tmp_path):
    bank = Bank(tmp_path / "bank")
    align(tiny_align, tiny_recipe(max_steps=2), tmp_path / "home", bank.root, domain="one")
    assert not (bank.load(1).folder / "fisher.safetensors").exists()
    assert bank.load(1).fisher() == {}
