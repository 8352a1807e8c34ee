"""Tests for lifealign_lite.prefix: one pass over each pair's prompt gives the same log-probs, losses and LoRA
gradients as running the prompt once per response (``prefix_sharing: off``), on a tiny random Llama in fp32.

Tolerance: both paths compute the same function in fp32, with different matrix shapes (one packed row per pair
instead of two padded rows) and a different order of summing the per-token terms, so they may differ by float
rounding only. fp32's unit rounding is 6e-8; a summed log-prob here is up to ~220 in size, so rounding
differences of ~1e-5 are possible and 1e-4 absolute bounds them (measured on this fixture: 0.0, the same bits);
gradients are compared per tensor relative to its largest entry (rtol 1e-4, atol 1e-4 x max |grad|; measured:
about 1e-6 relative). A wrong mask (rejected tokens seeing chosen ones) moves log-probs by far more
(``test_wrong_mask_would_be_caught``).
"""

from __future__ import annotations

import pytest
import torch

from lifealign_lite.evaluate import metrics_from_scores
from lifealign_lite.losses import fpo_loss
from lifealign_lite.model import SHORT, attach_adapters
from lifealign_lite.prefix import can_share, pack_pairs, use_sharing
from lifealign_lite.recipe import Recipe, RecipeError
from lifealign_lite.train import Tokenized, pair_logps, reference_logps, score_pairs, tokenize_pairs

from test_train import SYNTHETIC, tiny_recipe

pytestmark = pytest.mark.usefixtures("single_thread")
ATOL_LOGP = 1e-4


@pytest.fixture
def items(tiny_tokenizer):
    toks, _ = tokenize_pairs(SYNTHETIC, tiny_tokenizer, 96, 48)
    assert len({len(t.prompt) for t in toks}) > 3  # prompts of different lengths: the batch is padded
    return toks


def lora_model(base, seed: int = 7):
    """The tiny model with a short-term LoRA whose B is non-zero (at init B = 0, so A's gradient would be 0)."""
    model = attach_adapters(base, tiny_recipe())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{SHORT}." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def loss_and_grads(model, batch, pad, mode, ref):
    model.zero_grad(set_to_none=True)
    pc, pr, cn, rn = pair_logps(model, batch, pad, "cpu", prefix_sharing=mode)
    out = fpo_loss(pc, pr, ref[0], ref[1], beta=0.5, gamma=2.0)
    out.losses.mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.losses.detach(), torch.cat([pc, pr]).detach(), (cn, rn), grads


def test_shared_prefix_losses_and_lora_gradients_equal_unshared(tiny_base, items):
    model = lora_model(tiny_base)
    pad = tiny_base.tokenizer.pad_token_id
    batch = items[:7]
    with torch.no_grad():  # reference log-probs near the policy's: margins in [-1, 1], losses neither 0 nor saturated
        c, r, _, _ = pair_logps(model, batch, pad, "cpu", prefix_sharing="off")
    shift = torch.linspace(-2.0, 2.0, len(batch))
    ref = (c + shift, r - shift)
    loss_off, logps_off, counts_off, grads_off = loss_and_grads(model, batch, pad, "off", ref)
    loss_on, logps_on, counts_on, grads_on = loss_and_grads(model, batch, pad, "on", ref)
    assert (loss_off > 1e-3).all()
    assert counts_on[0].tolist() == counts_off[0].tolist() == [len(t.chosen) for t in batch]
    assert counts_on[1].tolist() == counts_off[1].tolist() == [len(t.rejected) for t in batch]
    assert torch.allclose(logps_on, logps_off, rtol=0, atol=ATOL_LOGP), (logps_on - logps_off).abs().max()
    assert torch.allclose(loss_on, loss_off, rtol=1e-5, atol=1e-7)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == 8  # A and B of q_proj and v_proj in 2 layers
    for name, g_off in grads_off.items():
        scale = g_off.abs().max()
        assert scale > 0, name  # every LoRA tensor gets a gradient: the comparison is not 0 == 0
        assert torch.allclose(grads_on[name], g_off, rtol=1e-4, atol=1e-4 * scale), name


def test_shared_prefix_matches_under_eager_attention(tiny_base, items):
    """The mask is additive (float) for eager attention and boolean for SDPA; both give the same log-probs."""
    model = lora_model(tiny_base)
    pad = tiny_base.tokenizer.pad_token_id
    with torch.no_grad():
        off = torch.cat(pair_logps(model, items[:5], pad, "cpu", prefix_sharing="off")[:2])
        tiny_base.model.config._attn_implementation = "eager"
        eager = torch.cat(pair_logps(model, items[:5], pad, "cpu", prefix_sharing="on")[:2])
    assert torch.allclose(eager, off, rtol=0, atol=ATOL_LOGP)


def test_pack_pairs_mask_and_positions():
    item = Tokenized(prompt=[5, 6, 7], chosen=[8, 9], rejected=[10, 11, 12])
    short = Tokenized(prompt=[5], chosen=[8], rejected=[10])
    ids, pos, mask, (rows, sources, targets, slots) = pack_pairs([item, short], 0, "sdpa", torch.float32)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12], [5, 8, 10, 0, 0, 0, 0, 0]]
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]  # the rejected part restarts where the prompt ends
    m = mask[0, 0]
    assert m[5, :3].all() and not m[5, 3:5].any() and m[5, 5] and not m[5, 6:].any()  # rejected: prompt and itself, no chosen
    assert m[4, :5].all() and not m[4, 5:].any()  # chosen: causal
    assert mask[1, 0, 2].tolist() == [True, False, True, False, False, False, False, False]
    assert mask[1, 0, 5].tolist() == [True] * 3 + [False, False, True, False, False]  # padding: the real tokens and itself
    # chosen 8 and rejected 10 both predicted from the prompt's last position (2 in row 0, 0 in row 1)
    assert list(zip(rows.tolist(), sources.tolist(), targets.tolist(), slots.tolist())) == [
        (0, 2, 8, 0), (0, 3, 9, 0), (0, 2, 10, 2), (0, 5, 11, 2), (0, 6, 12, 2), (1, 0, 8, 1), (1, 0, 10, 3)]
    eager = pack_pairs([item], 0, "eager", torch.float32)[2]
    assert eager.dtype == torch.float32 and eager[0, 0, 5, 3] == torch.finfo(torch.float32).min and eager[0, 0, 5, 2] == 0


def test_wrong_mask_would_be_caught(tiny_base, items, monkeypatch):
    """If rejected tokens could see the chosen ones, the log-probs would move far outside the tolerance."""
    from lifealign_lite import prefix

    model = lora_model(tiny_base)
    pad = tiny_base.tokenizer.pad_token_id
    real = prefix.pack_pairs

    def leaky(*args):
        ids, pos, mask, picks = real(*args)
        return ids, pos, torch.ones_like(mask).tril(), picks

    with torch.no_grad():
        off = pair_logps(model, items[:4], pad, "cpu", prefix_sharing="off")[1]
        monkeypatch.setattr(prefix, "pack_pairs", leaky)
        bad = pair_logps(model, items[:4], pad, "cpu", prefix_sharing="on")[1]
    assert (bad - off).abs().max() > 100 * ATOL_LOGP


def test_scores_and_preference_accuracy_unchanged(tiny_base, items):
    """reference_logps / score_pairs (no grad) and eval's preference accuracy: the same with and without sharing."""
    model = lora_model(tiny_base)
    pad = tiny_base.tokenizer.pad_token_id
    ref = {m: reference_logps(model, items, pad, "cpu", batch_size=5, prefix_sharing=m) for m in ("on", "off")}
    now = {m: score_pairs(model, items, pad, "cpu", batch_size=5, prefix_sharing=m) for m in ("on", "off")}
    for scores in (ref, now):
        for key in ("chosen", "rejected"):
            assert torch.allclose(scores["on"][key], scores["off"][key], rtol=0, atol=ATOL_LOGP)
        assert torch.equal(scores["on"]["chosen_tokens"], scores["off"]["chosen_tokens"])
    assert not torch.allclose(ref["on"]["chosen"], now["on"]["chosen"])  # the LoRA changes the scores
    metrics = {m: metrics_from_scores(now[m], ref[m], beta=0.5) for m in ("on", "off")}
    assert metrics["on"]["pref_acc"] == metrics["off"]["pref_acc"]
    assert metrics["on"] == pytest.approx(metrics["off"], abs=1e-5)


def test_empty_prompt_falls_back_and_modes_are_checked():
    items = [Tokenized([1, 2], [3], [4]), Tokenized([], [3], [4])]
    assert can_share(items[:1]) and not can_share(items)
    assert use_sharing("auto", items[:1]) and use_sharing("on", items[:1]) and not use_sharing("off", items[:1])
    assert not use_sharing("on", items)
    assert not use_sharing("auto", items[:1], "cuda") and use_sharing("on", items[:1], "cuda")  # auto: CPU only (measured there)
    with pytest.raises(ValueError, match="prefix_sharing"):
        use_sharing("yes", items)
    assert Recipe().prefix_sharing == "auto"
    with pytest.raises(RecipeError, match="prefix_sharing"):
        Recipe(prefix_sharing="always").validate()
