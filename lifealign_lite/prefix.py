"""Prefix sharing: a pair's prompt goes through the model once for both of its responses.

Each pair becomes one packed row ``[prompt, chosen, rejected]``. A 4D attention mask lets every token see
the tokens before it, except that rejected tokens do not see chosen ones, and the rejected part's position
ids restart where the prompt ends; so each response sees exactly what it would see in its own sequence
``[prompt, response]``, and its log-probs are the same (up to float rounding), gradients included: autograd
runs through the prompt's one computation into the LoRA from both branches. The prompt's tokens go through
the linear layers once instead of twice.

The first token of each response is predicted from the prompt's last position, which both responses share.
"""

from __future__ import annotations

from typing import Sequence

import torch

MODES = ("auto", "on", "off")


def can_share(items: Sequence) -> bool:
    """Packing needs a non-empty prompt in every pair (its last position predicts both responses' first token)."""
    return all(len(t.prompt) > 0 for t in items)


def use_sharing(mode: str, items: Sequence, device="cpu") -> bool:
    """Whether ``pair_logps`` takes the shared path for this batch. ``on`` shares wherever packing works;
    ``auto`` does so on a CPU, where it measured faster (docs/PERFORMANCE.md), and not on other devices, where
    it is unmeasured (on CUDA a custom mask rules out SDPA's flash kernel); ``off`` never shares."""
    if mode not in MODES:
        raise ValueError(f"prefix_sharing must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto" and torch.device(device).type != "cpu":
        return False
    return mode != "off" and can_share(items)


def pack_pairs(items: Sequence, pad_id: int, attn_implementation: str, dtype: torch.dtype):
    """Right-padded packed rows: input ids, position ids, the 4D attention mask, and where each response's
    log-prob terms come from (row, position of the predicting hidden state, target id, output slot)."""
    n = len(items)
    lengths = [len(t.prompt) + len(t.chosen) + len(t.rejected) for t in items]
    width = max(lengths)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    # segment of every position: 0 prompt, 1 chosen, 2 rejected, 3 padding
    segment = torch.full((n, width), 3, dtype=torch.long)
    rows, sources, targets, slots = [], [], [], []
    for row, t in enumerate(items):
        p, c, r = len(t.prompt), len(t.chosen), len(t.rejected)
        ids[row, : lengths[row]] = torch.tensor(t.prompt + t.chosen + t.rejected)
        positions[row, : p + c] = torch.arange(p + c)
        positions[row, p + c : p + c + r] = torch.arange(p, p + r)
        segment[row, :p], segment[row, p : p + c], segment[row, p + c : p + c + r] = 0, 1, 2
        # token k of a response is predicted by the position before it; token 0 by the prompt's last one
        for start, response, slot in ((p, t.chosen, row), (p + c, t.rejected, n + row)):
            src = list(range(start - 1, start + len(response) - 1))
            src[:1] = [p - 1] * min(1, len(response))
            rows += [row] * len(response)
            sources += src
            targets += response
            slots += [slot] * len(response)
    index = torch.arange(width)
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    allowed = (index[None, :, None] >= index[None, None, :]) & (seg_k != 3) & ~((seg_q == 2) & (seg_k == 1))
    allowed |= (seg_q == 3) & (index[None, :, None] == index[None, None, :])  # padding also sees itself: no all-masked row
    mask = allowed[:, None]
    if attn_implementation != "sdpa":  # eager attention adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    picks = tuple(torch.tensor(v, dtype=torch.long) for v in (rows, sources, targets, slots))
    return ids, positions, mask, picks


def shared_pair_logps(lm, items: Sequence, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pair_logps`` with one pass per pair over the prompt: (chosen logps, rejected logps, chosen token
    counts, rejected token counts). ``lm`` is the transformers CausalLM (LoRA layers inside it apply)."""
    decoder = lm.get_decoder()
    dtype = next(lm.parameters()).dtype
    ids, positions, mask, picks = pack_pairs(items, pad_id, lm.config._attn_implementation, dtype)
    rows, sources, targets, slots = (v.to(device) for v in picks)
    hidden = decoder(input_ids=ids.to(device), position_ids=positions.to(device), attention_mask=mask.to(device)).last_hidden_state
    logits = lm.get_output_embeddings()(hidden[rows, sources]).float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    n = len(items)
    sums = torch.zeros(2 * n, dtype=token_logps.dtype, device=device).index_add(0, slots, token_logps)
    counts = torch.tensor([len(t.chosen) for t in items] + [len(t.rejected) for t in items], device=device)
    return sums[:n], sums[n:], counts[:n], counts[n:]
