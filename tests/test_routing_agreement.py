"""One routing decision everywhere (issue 25 point 1): ``route --json``, ``chat --domain auto`` and serve's
``model: auto`` name the same memory for every prompt, because all three take the embedder (the bank's router, on
the bank's base model) and the threshold (the recipe's) from one place: ``session.routing``.

A three-domain bank on the tiny model, routed by its own hidden states (no embedding model to load), and 50 real
prompts from the three domains' data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def three_domain_bank(tiny_model_dir, tmp_path_factory):
    from conftest import SHARED_DATA
    from lifealign_lite.align import align
    from lifealign_lite.recipe import load_recipe

    shared_data = SHARED_DATA
    root = tmp_path_factory.mktemp("three-domains")
    recipe = load_recipe("edge-cpu", {"model": str(tiny_model_dir), "router": "base", "max_steps": 2, "batch_size": 2, "max_pairs": 8})
    for domain, data in (("medical", REPO / "examples" / "medical.jsonl"), ("support", REPO / "examples" / "support.jsonl"),
                         ("truthfulqa", shared_data / "truthfulqa" / "train.jsonl")):
        align(data, recipe, root / "home", root / "bank", domain=domain)
    return root / "bank", root / "home", recipe


def prompts(shared_data: Path) -> list[list[dict]]:
    """50 one-turn conversations: the sample domains' prompts and dev prompts of truthfulqa and hh-helpful."""
    texts = []
    for path in (REPO / "examples" / "medical.jsonl", REPO / "examples" / "support.jsonl", shared_data / "truthfulqa" / "dev.jsonl",
                 shared_data / "hh-helpful" / "dev.jsonl"):
        for line in path.read_text().splitlines()[:13]:
            prompt = json.loads(line)["prompt"]
            texts.append(prompt if isinstance(prompt, str) else prompt[-1]["content"])
    return [[{"role": "user", "content": t}] for t in texts[:50]]


def test_route_json_chat_auto_and_serve_auto_agree_on_50_prompts(three_domain_bank, shared_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lifealign_lite.chat import open_session
    from lifealign_lite.cli.app import app
    from lifealign_lite.serve import Engine
    from lifealign_lite.serve_api import Job

    bank, home, recipe = three_domain_bank
    monkeypatch.setenv("LIFEALIGN_HOME", str(home))
    session = open_session(bank, home, recipe, domain="auto")  # chat --domain auto on torch (the tiny model has no GGUF)
    engine = Engine(open_session(bank, home, recipe), bank, log=lambda s: None)
    conversations = prompts(shared_data)
    assert len(conversations) == 50
    runner, said = CliRunner(), []
    for i, conversation in enumerate(conversations):
        file = tmp_path / f"{i}.json"
        file.write_text(json.dumps(conversation))
        result = runner.invoke(app, ["route", "--messages", str(file), "--bank", str(bank), "--json"])
        assert result.exit_code == 0, result.output
        routed = json.loads(result.stdout)["domain"]
        chat = session.memory_for(conversation)[1].domain
        served = engine._route(Job(prompt=conversation, model="auto", max_tokens=1)).route["domain"]
        said.append((routed, chat, served))
    assert all(r == c == s for r, c, s in said), [x for x in said if len(set(x)) > 1]
    assert len({r for r, _, _ in said}) >= 2  # the prompts reach more than one memory: agreement is not trivial
