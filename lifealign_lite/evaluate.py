"""Scores that need no judge model, on held-out preference pairs (../shared/DESIGN.md, evaluation protocol).

- preference accuracy: share of pairs whose implicit reward (margin against the base model) ranks the chosen
  response above the rejected one, ties counting one half;
- length-normalized preference accuracy: share where the mean per-token log-prob of chosen beats rejected
  (the base model has a real score here, so forward transfer is meaningful);
- mean reward margin: ``beta * h`` averaged over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from collections import defaultdict
from typing import Sequence

import torch

from .chat import ChatSession
from .data import Pair
from .batching import tokenize_pairs
from .logprobs import score_pairs
from .session import AUTO, BASE

METRICS = ("pref_acc", "lennorm_acc", "margin")


def per_pair_scores(policy: dict[str, torch.Tensor], base: dict[str, torch.Tensor], beta: float) -> dict[str, torch.Tensor]:
    """Each pair's three scores (1, 0.5 or 0 for the accuracies; ``beta * h`` for the margin): the bootstrap's input."""
    h = (policy["chosen"] - policy["rejected"]) - (base["chosen"] - base["rejected"])
    c = policy["chosen"] / policy["chosen_tokens"].clamp(min=1)
    r = policy["rejected"] / policy["rejected_tokens"].clamp(min=1)
    return {"pref_acc": (h > 0).float() + 0.5 * (h == 0).float(), "lennorm_acc": (c > r).float() + 0.5 * (c == r).float(),
            "margin": beta * h}


def summarize_pairs(per_pair: dict[str, torch.Tensor]) -> dict[str, float]:
    """The three scores of a set of pairs (means of ``per_pair_scores``), with its tie and pair counts."""
    h = per_pair["margin"]
    return {k: float(v.mean()) for k, v in per_pair.items()} | {"ties": int((h == 0).sum()), "pairs": int(h.numel())}


def metrics_from_scores(policy: dict[str, torch.Tensor], base: dict[str, torch.Tensor], beta: float) -> dict[str, float]:
    """The three scores of a set of pairs from its policy and base log-probs (outputs of ``score_pairs``)."""
    return summarize_pairs(per_pair_scores(policy, base, beta))


def _subset(scores: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in scores.items()}


@dataclass
class Evaluation:
    """What :func:`evaluate` found.

    ``summary`` holds the JSON-able figures (what ``eval --json`` prints); ``base_scores`` the base model's
    ``score_pairs`` output, to pass back as ``base_scores`` when the same pairs are scored again; ``per_pair`` each
    pair's scores (lists), for paired intervals.
    """

    summary: dict
    base_scores: dict[str, torch.Tensor]
    per_pair: dict[str, list[float]]


def evaluate(session: ChatSession, pairs: Sequence[Pair], recipe, domain: str, reporter=None, base_scores: dict | None = None) -> Evaluation:
    """Score ``pairs`` with the memory ``domain`` selects (a domain, ``auto``, ``core`` or ``base``).

    ``base_scores`` (the base model's ``score_pairs`` output for these pairs) skips recomputing the reference.
    """
    items, _ = tokenize_pairs(pairs, session.tokenizer, recipe.max_length, recipe.max_prompt_length)
    session.set_domain(domain)
    if domain == AUTO:
        memories = [session.memory_for(p.prompt)[0] for p in pairs]
    else:
        memories = [domain] * len(pairs)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, m in enumerate(memories):
        groups[m].append(i)
    report = reporter.advance if reporter else (lambda *a: None)
    if reporter:
        reporter.start("score", (len(pairs) if base_scores is None else 0) + sum(len(i) for m, i in groups.items() if m != BASE))
    device = next(session.model.parameters()).device
    pad = session.tokenizer.pad_token_id

    # scores run in the recipe's score_precision (fp32 by default) whatever training used: bf16 rounding moves the
    # logits by more than a short adapter does, and would make most pairs exact ties
    bf16 = recipe.score_precision == "bf16"

    def score(subset):
        return score_pairs(session.model, subset, pad, device, progress=lambda n: report("score", n, {}), bf16_autocast=bf16,
                           prefix_sharing=recipe.prefix_sharing)

    if base_scores is None:
        with session.using(BASE):
            base_scores = score(items)
    policy = {k: v.clone() for k, v in base_scores.items()}
    for memory, idx in groups.items():
        if memory == BASE:
            continue
        with session.using(memory):
            scored = score([items[i] for i in idx])
        for k in policy:
            policy[k][idx] = scored[k]
    per_pair = per_pair_scores(policy, base_scores, recipe.beta)
    result = {"domain": domain, **summarize_pairs(per_pair), "memory_used": {m: len(i) for m, i in groups.items()},
              "score_precision": recipe.score_precision}
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        if p.domain:
            by_domain[p.domain].append(i)
    if by_domain:
        result["per_domain"] = {d: metrics_from_scores(_subset(policy, idx), _subset(base_scores, idx), recipe.beta) for d, idx in sorted(by_domain.items())}
    return Evaluation(result, base_scores, {k: v.tolist() for k, v in per_pair.items()})
