"""Log-probabilities of responses under the model: the one forward pass that training (the preference loss),
evaluation (implicit rewards) and the regularizers (Fisher information) all share."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .batching import Tokenized, collate
from .model import autocast, reference_mode
from .prefix import shared_pair_logps, use_sharing


def causal_lm(model):
    """The transformers CausalLM inside a PEFT wrapper (LoRA layers live inside it, so they still apply)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sequence_logps(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the labelled tokens of each row, and their count.

    The output head (vocabulary-sized) runs only on positions that predict a response token, which saves
    memory and time when prompts are long.
    """
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(ids.shape[0], dtype=token_logps.dtype, device=ids.device).index_add(0, rows, token_logps)
    counts = keep.sum(1)
    return sums, counts


def pair_logps(model, items: Sequence[Tokenized], pad_id: int, device, *, prefix_sharing: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logps, rejected logps, chosen token counts, rejected token counts) of a batch, in one forward pass.

    ``prefix_sharing`` (the recipe key, auto|on|off): each pair's prompt runs once for both responses
    (``prefix.py``), or, with ``off``, each response runs in its own sequence with the prompt in front.
    """
    if use_sharing(prefix_sharing, items, device):
        return shared_pair_logps(causal_lm(model), items, pad_id, device)
    seqs = [(t.prompt, t.chosen) for t in items] + [(t.prompt, t.rejected) for t in items]
    sums, counts = sequence_logps(model, *collate(seqs, pad_id, device))
    n = len(items)
    return sums[:n], sums[n:], counts[:n], counts[n:]


class PairScorer(torch.nn.Module):
    """:func:`pair_logps` as a module's forward pass, so that a data-parallel wrapper around it (DDP, FSDP: what
    ``accelerate`` prepares) sees the forward it hooks: DDP readies its gradient all-reduce there, FSDP gathers
    its parameter shards. ``model`` is the PEFT model; one process calls it directly, with the same result."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, items: Sequence[Tokenized], pad_id: int, device, prefix_sharing: str = "auto"):
        return pair_logps(self.model, items, pad_id, device, prefix_sharing=prefix_sharing)


@torch.no_grad()
def score_pairs(model, items: Sequence[Tokenized], pad_id: int, device, batch_size: int = 8, progress: Callable[[int], None] | None = None,
                bf16_autocast: bool = False, prefix_sharing: str = "auto", forward: Callable | None = None) -> dict[str, torch.Tensor]:
    """Log-probs of every pair under the model as it is now (no grad), in length-sorted batches.

    ``forward`` (optional) runs a batch instead of ``pair_logps(model, ...)``: a data-parallel wrapper's
    :class:`PairScorer` (the same arguments)."""
    was_training = model.training
    model.eval()
    n = len(items)
    out = {k: torch.zeros(n) for k in ("chosen", "rejected")}
    out.update({k: torch.zeros(n, dtype=torch.long) for k in ("chosen_tokens", "rejected_tokens")})
    order = sorted(range(n), key=lambda i: items[i].tokens)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        with autocast(bf16_autocast):
            batch = [items[i] for i in idx]
            c, r, cn, rn = forward(batch, pad_id, device, prefix_sharing) if forward else pair_logps(model, batch, pad_id, device, prefix_sharing=prefix_sharing)
        for key, val in zip(("chosen", "rejected", "chosen_tokens", "rejected_tokens"), (c, r, cn, rn)):
            out[key][idx] = val.cpu().to(out[key].dtype)
        if progress:
            progress(len(idx))
    model.train(was_training)
    return out


def reference_logps(model, items, pad_id, device, batch_size=8, progress=None, bf16_autocast: bool = False,
                    bare: bool = False, prefix_sharing: str = "auto", forward: Callable | None = None) -> dict[str, torch.Tensor]:
    """Reference log-probs, computed once per task: the model as the task began (short-term adapter off), or
    with ``bare`` the base model alone (every adapter off)."""
    with reference_mode(model, bare=bare):
        return score_pairs(model, items, pad_id, device, batch_size, progress, bf16_autocast, prefix_sharing, forward)
