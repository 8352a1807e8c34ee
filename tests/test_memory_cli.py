"""`memory list` sizes and `memory gc` on a bank aligned with the tiny model (no real model, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifealign_lite.memory.bank import Bank, folder_size
from lifealign_lite.recipe import load_recipe

from conftest import align_examples, copy_bank
from conftest import invoke_cli as invoke


@pytest.fixture(scope="module")
def three_versions(tmp_path_factory, tiny_model_dir) -> Path:
    """medical (v1), support (v2), medical again (v3), with the tiny model."""
    recipe = load_recipe("edge-cpu", {"model": str(tiny_model_dir), "router": "base", "max_steps": 1, "batch_size": 2, "max_pairs": 4})
    return align_examples(tmp_path_factory.mktemp("three") / "bank", tmp_path_factory.mktemp("home"), recipe, ("medical", "support", "medical"))


@pytest.fixture
def three_version_copy(three_versions, tmp_path) -> Bank:
    """A private copy of ``three_versions`` for a test that changes it."""
    return copy_bank(three_versions, tmp_path / "bank")


def test_list_shows_rank_bytes_and_bank_against_its_loras(three_version_copy, tmp_path):
    bank = three_version_copy
    result = invoke(["memory", "list", "--json", "--bank", bank.root], tmp_path / "home")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    state = bank.load()
    assert listing["version"] == 3 and listing["versions_on_disk"] == 3
    assert listing["version_bytes"] == folder_size(bank.version_dir(3)) and listing["bank_bytes"] == folder_size(bank.root / "versions")
    assert listing["loras"] == 3  # the three short-term adapters under runs/
    runs = sorted((bank.root / "runs").glob("*/adapter/adapter_model.safetensors"))
    assert listing["lora_bytes"] == sum(p.stat().st_size for p in runs)
    entries = {e["domain"]: e for e in listing["entries"]}
    for name in ("medical", "support"):
        config = json.loads((state.slot_dir(name) / "adapter_config.json").read_text())
        assert entries[name]["rank"] == config["r"] <= state.meta["bank_rank"]
        assert entries[name]["size_bytes"] == folder_size(state.slot_dir(name))
    # versions share what they did not change: three versions cost less than three times the current one
    assert listing["bank_bytes"] < 3 * listing["version_bytes"]
    table = invoke(["memory", "list", "--bank", bank.root], tmp_path / "home")
    assert table.exit_code == 0 and "rank" in table.stdout and "bytes" in table.stdout
    assert "short-term LoRAs it was built from" in table.stderr


def test_gc_keeps_rollback_to_kept_versions_and_refuses_removed_ones(three_version_copy, tmp_path):
    bank = three_version_copy
    home = tmp_path / "home"
    result = invoke(["memory", "gc", "--keep", "2", "--bank", bank.root], home)
    assert result.exit_code == 0, result.output
    assert "removed version 1; freed" in result.stderr
    assert sorted(p.name for p in (bank.root / "versions").iterdir()) == ["000002", "000003"]
    verify = invoke(["memory", "verify", "--all", "--bank", bank.root], home)
    assert verify.exit_code == 0 and verify.stdout.count(" ok ") == 2, verify.stdout
    assert invoke(["memory", "rollback", "2", "--bank", bank.root], home).exit_code == 0
    assert Bank(bank.root).load().version == 2 and Bank(bank.root).load().tasks == ["medical", "support"]
    refused = invoke(["memory", "rollback", "1", "--bank", bank.root], home)
    assert refused.exit_code != 0 and "version 1 was removed by `lifealign-lite memory gc`" in refused.stderr
    again = invoke(["memory", "gc", "--keep", "5", "--bank", bank.root], home)
    assert again.exit_code == 0 and "nothing to remove" in again.stderr
    bad = invoke(["memory", "gc", "--keep", "0", "--bank", bank.root], home)
    assert bad.exit_code != 0 and "--keep must be at least 1" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
