"""The lifelong stream end to end: medical then support aligned into one bank, a re-alignment, a bank built on
another base, a process killed while it writes a version, and commit failures.

The integration tests use the real default model (SmolLM2-135M-Instruct) with tiny runs (2 steps of 2 pairs,
8 pairs per task); the two-task bank is built once per session and shared with tests/test_chat.py through
the session's base temp folder. Commit failures and the CLI error paths run without any model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from lifealign_lite.align import align, pick_domain
from lifealign_lite.data import load_pairs, pairs_hash
from lifealign_lite.memory.adapter import BankError, read_adapter, replace_adapter
from lifealign_lite.memory.bank import Bank
from lifealign_lite.memory.state import BankState
from lifealign_lite.memory.consolidate import LowRank
from lifealign_lite.recipe import RecipeError, load_recipe

from conftest import reaped, require_path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CLI = Path(sys.executable).parent / "lifealign-lite"
# Tiny runs (the CPU is shared): 2 optimizer steps of 2 pairs, 8 pairs per task.
PAIRS = 8
OVERRIDES = {"max_steps": 2, "batch_size": 2, "max_pairs": PAIRS}
DOMAINS = ("medical", "support")


# -- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bank2(two_domain_bank) -> Bank:
    return Bank(two_domain_bank)


def private_copy(bank: Bank, dest: Path, runs: bool = True) -> Bank:
    shutil.copytree(bank.root, dest, ignore=None if runs else shutil.ignore_patterns("runs"))
    return Bank(dest)


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_version_complete(bank: Bank, version: int) -> BankState:
    """Every file of a version reads: state, core, each slot, keys (one per domain), history, replay."""
    state = bank.load(version)
    assert state.version == version and state.domains
    assert state.core_dir() is not None
    for folder in [state.core_dir(), *(state.slot_dir(d) for d in state.domains)]:
        update, config = read_adapter(folder)
        assert update and 1 <= config["r"] <= state.meta["bank_rank"]  # stored at its own rank, bounded by the bank rank
        assert all(torch.isfinite(u.B).all() and torch.isfinite(u.A).all() for u in update.values())
    keys = state.keys()
    assert set(keys) == set(state.domains)
    assert all(torch.allclose(k.norm(dim=1), torch.ones(len(k)), atol=1e-4) for k in keys.values())
    assert len(state.history()) == len(state.tasks)
    assert state.replay()
    return state


# -- the two-task stream -------------------------------------------------------------------------------------

@pytest.mark.integration
def test_two_tasks_make_two_versions(bank2):
    manifest = bank2.manifest()
    assert manifest["current"] == 2 and [v["version"] for v in manifest["versions"]] == [1, 2]
    assert manifest["base"]["name"] == "SmolLM2-135M-Instruct" and manifest["base"]["fingerprint"]
    state = assert_version_complete(bank2, 2)
    assert sorted(state.domains) == ["medical", "support"] and state.tasks == ["medical", "support"]
    assert len(state.history()) == 2
    assert {p.domain for p in state.replay()} == {"medical", "support"}
    v1 = assert_version_complete(bank2, 1)
    assert sorted(v1.domains) == ["medical"] and len(v1.history()) == 1
    # medical's slot was not touched by the support task: v2 shares v1's file.
    assert (v1.slot_dir("medical") / "adapter_model.safetensors").stat().st_ino == (state.slot_dir("medical") / "adapter_model.safetensors").stat().st_ino


@pytest.mark.integration
def test_bank_adapters_load_in_peft_with_the_bank_deltas(bank2, lifealign_home):
    from peft import PeftModel

    from lifealign_lite.model import load_base

    state = bank2.load()
    base = load_base("default", lifealign_home, "none")
    folders = {"core": state.core_dir(), **{d: state.slot_dir(d) for d in state.domains}}
    model = None
    for name, folder in folders.items():
        if model is None:
            model = PeftModel.from_pretrained(base.model, str(folder), adapter_name=name)
        else:
            model.load_adapter(str(folder), adapter_name=name)
    module_name = "model.layers.0.self_attn.q_proj"
    module = model.get_submodule(f"base_model.model.{module_name}")
    deltas = {}
    for name, folder in folders.items():
        expected = read_adapter(folder)[0][module_name].dense()
        deltas[name] = module.get_delta_weight(name)
        torch.testing.assert_close(deltas[name], expected, rtol=1e-4, atol=1e-6)
        assert deltas[name].abs().max() > 0, f"{name}: the adapter should hold a non-zero update"
    assert not torch.allclose(deltas["medical"], deltas["support"])


@pytest.mark.integration
def test_lineage_records_data_recipe_time_and_replay(bank2):
    state = bank2.load()
    med, sup = state.domains["medical"], state.domains["support"]
    assert med["pairs_seen"] == PAIRS and sup["pairs_seen"] == PAIRS
    assert len(med["lineage"]) == 1 and len(sup["lineage"]) == 1
    first, second = med["lineage"][0], sup["lineage"][0]
    assert first["trained_from"] == "base" and first["replayed"] == 0
    # core_from slot (the default): a new domain's one run is its slot, from the bare base on its own pairs
    assert second["trained_from"] == "base" and second["replayed"] == 0
    for domain, entry in (("medical", first), ("support", second)):
        assert entry["data_hash"] == pairs_hash(load_pairs(EXAMPLES / f"{domain}.jsonl", max_pairs=PAIRS, seed=0))
        assert entry["recipe"] == "edge-cpu" and len(entry["recipe_hash"]) == 12
        assert entry["pairs"] == PAIRS and entry["base"] == "SmolLM2-135M-Instruct"
        datetime.fromisoformat(entry["time"])
        assert 0 < entry["consolidation"]["mean_energy_kept"] <= 1
        run = bank2.root / "runs" / entry["run"]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["bank_version"] == (1 if domain == "medical" else 2)
        assert summary["replayed_pairs"] == entry["replayed"] and summary["steps"] == 2
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert second["consolidation"]["mean_hist_fraction"] >= 0


@pytest.mark.integration
def test_realigning_a_domain_updates_its_slot(bank2, lifealign_home, tmp_path):
    bank = private_copy(bank2, tmp_path / "bank")
    before = bank.load()
    result = align(EXAMPLES / "medical.jsonl", load_recipe("edge-cpu", {**OVERRIDES, "max_steps": 1}), lifealign_home, bank.root, domain="medical")
    assert result.bank_version == 3 and bank.manifest()["current"] == 3
    state = assert_version_complete(bank, 3)
    med = state.domains["medical"]
    assert med["pairs_seen"] == 2 * PAIRS and len(med["lineage"]) == 2
    assert med["lineage"][-1]["trained_from"] == "slot medical v2"
    assert result.summary["trained_from"] == "slot medical v2"
    assert state.tasks == ["medical", "support", "medical"] and len(state.history()) == 3
    new_slot = (state.slot_dir("medical") / "adapter_model.safetensors").read_bytes()
    assert new_slot != (before.slot_dir("medical") / "adapter_model.safetensors").read_bytes()
    # support's slot is untouched (a hard link to v2's file), and v2 still loads as it was.
    assert (state.slot_dir("support") / "adapter_model.safetensors").stat().st_ino == (before.slot_dir("support") / "adapter_model.safetensors").stat().st_ino
    assert bank.load(2).domains["medical"]["pairs_seen"] == PAIRS


@pytest.mark.integration
def test_bank_of_another_base_is_refused(bank2, lifealign_home, tmp_path):
    bank = private_copy(bank2, tmp_path / "bank", runs=False)
    manifest = bank.manifest()
    manifest["base"]["fingerprint"] = "0000000000000000"
    bank.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BankError, match=r"was built on 'SmolLM2-135M-Instruct' \(fingerprint 0000000000000000\)"):
        align(EXAMPLES / "medical.jsonl", load_recipe("edge-cpu", OVERRIDES), lifealign_home, bank.root, domain="medical")
    assert bank.manifest()["current"] == 2
    assert sorted(p.name for p in (bank.root / "versions").iterdir()) == ["000001", "000002"]
    assert not (bank.root / "runs").exists(), "nothing may be trained or saved for a refused bank"


# -- killed while writing a version --------------------------------------------------------------------------

@pytest.mark.integration
def test_sigkill_while_consolidating_leaves_a_whole_version(bank2, lifealign_home, tmp_path):
    require_path(CLI, "the lifealign-lite console script")
    bank = private_copy(bank2, tmp_path / "bank", runs=False)
    old = {v: file_digests(bank.version_dir(v)) for v in (1, 2)}
    env = dict(os.environ, LIFEALIGN_HOME=str(lifealign_home))
    rng = random.Random()
    delay = rng.uniform(0.0, 0.05)
    log = tmp_path / "align.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(CLI), "align", str(EXAMPLES / "medical.jsonl"), "--domain", "medical", "--bank", str(bank.root),
                                 "--max-steps", "1", "--max-pairs", "8", "--batch-size", "2"], env=env, stdout=fh, stderr=subprocess.STDOUT)
    phase = "start"
    with reaped(proc):
        deadline = time.monotonic() + 400
        # The short-term adapter is saved right before consolidation ...
        while proc.poll() is None and not list((bank.root / "runs").glob("*-medical/adapter/adapter_config.json")):
            assert time.monotonic() < deadline, "align did not reach consolidation in time"
            time.sleep(0.005)
        phase = "adapter saved"
        # ... and the new version is written in a temporary folder under versions/: kill while it is.
        while proc.poll() is None and not list((bank.root / "versions").glob(".tmp-*")):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        if proc.poll() is None:
            phase = "writing version"
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    where = f"killed at phase {phase!r} + {delay * 1000:.1f} ms; return code {proc.returncode}; log: {log.read_text()[-800:]}"
    print(where[:120])  # shown with -rP: which phase the kill hit
    assert proc.returncode in (0, -signal.SIGKILL), where

    manifest = bank.manifest()
    assert manifest["current"] in (2, 3), where
    state = assert_version_complete(bank, manifest["current"])
    assert state.domains["medical"]["pairs_seen"] == (PAIRS if manifest["current"] == 2 else PAIRS + 8), where
    for v in (1, 2):  # earlier versions are byte for byte what they were (no write went through a hard link)
        assert file_digests(bank.version_dir(v)) == old[v], f"version {v} changed; {where}"
        assert_version_complete(bank, v)
    listed = {v["version"] for v in manifest["versions"]}
    assert listed == ({1, 2} if manifest["current"] == 2 else {1, 2, 3}), where
    # The lock died with the process, and the bank takes a new version on top of whatever was left.
    with bank.lock(wait_s=0):
        pending = bank.begin(state, event="after kill")
        committed = bank.commit(pending, manifest["base"])
    assert committed.version > manifest["current"] and bank.load().version == committed.version
    assert_version_complete(bank, committed.version)
    print("left in versions/:", sorted(p.name for p in (bank.root / "versions").iterdir()))


# -- commit failures (no model) ------------------------------------------------------------------------------

BASE = {"name": "tiny", "fingerprint": "fp-tiny"}
MODULE = "model.layers.0.self_attn.q_proj"


def _tiny_update(seed: int) -> dict[str, LowRank]:
    g = torch.Generator().manual_seed(seed)
    return {MODULE: LowRank(torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g))}


def _pending(bank: Bank, parent: BankState, domain: str, seed: int):
    from lifealign_lite.data import Pair

    pending = bank.begin(parent, event=f"align {domain}")
    replace_adapter(pending.folder / "core", _tiny_update(seed), 4, ["q_proj"], BASE["name"])
    replace_adapter(pending.folder / "slots" / domain, _tiny_update(seed + 1), 4, ["q_proj"], BASE["name"])
    pending.state.domains[domain] = {"pairs_seen": 1, "lineage": []}
    pending.state.tasks.append(domain)
    pending.state.meta = {"bank_rank": 4, "target_modules": ["q_proj"]}
    pending.keys = {**parent.keys(), domain: torch.nn.functional.normalize(torch.ones(1, 4), dim=1)}
    pending.history = parent.history() + [_tiny_update(seed + 2)]
    pending.replay = parent.replay() + [Pair([{"role": "user", "content": f"q{seed}"}], [{"role": "assistant", "content": "a"}],
                                             [{"role": "assistant", "content": "b"}], domain)]
    return pending


class ManifestFails(Bank):
    def _write_manifest(self, manifest: dict) -> None:
        raise OSError("disk full while writing the manifest")


def _commit_or_abort(bank: Bank, pending) -> BankState:
    try:
        return bank.commit(pending, BASE)
    except BaseException:
        bank.abort(pending)
        raise


def test_failed_manifest_write_keeps_previous_version(tmp_path):
    bank = Bank(tmp_path / "bank")
    v1 = _commit_or_abort(bank, _pending(bank, bank.load(), "medical", 1))
    before = file_digests(v1.folder)
    broken = ManifestFails(bank.root)
    with pytest.raises(OSError, match="disk full"):
        _commit_or_abort(broken, _pending(broken, bank.load(), "support", 5))
    assert bank.manifest()["current"] == 1 and [v["version"] for v in bank.manifest()["versions"]] == [1]
    state = bank.load()
    assert state.version == 1 and sorted(state.domains) == ["medical"]
    assert file_digests(v1.folder) == before
    assert not list((bank.root / "versions").glob(".tmp-*"))
    # The next good commit is listed with its true parent and loads; nothing unlisted becomes current.
    v_next = _commit_or_abort(bank, _pending(bank, bank.load(), "support", 7))
    assert bank.manifest()["versions"][-1]["parent"] == 1
    assert sorted(v_next.domains) == ["medical", "support"] and bank.load().version == v_next.version
    with pytest.raises(BankError, match="no version 2"):
        bank.rollback(2)  # the orphaned folder of the failed commit is not a version


def test_failure_before_rename_leaves_no_temporary_folder(tmp_path):
    bank = Bank(tmp_path / "bank")
    _commit_or_abort(bank, _pending(bank, bank.load(), "medical", 1))
    pending = _pending(bank, bank.load(), "support", 5)
    pending.replay = ["not a pair"]  # write_pairs refuses it, after keys and history were written
    with pytest.raises(TypeError):
        _commit_or_abort(bank, pending)
    assert sorted(p.name for p in (bank.root / "versions").iterdir()) == ["000001"]
    assert bank.manifest()["current"] == 1 and sorted(bank.load().domains) == ["medical"]
    assert len(bank.load().history()) == 1


# -- align's own checks (no model) ----------------------------------------------------------------------------

def test_pick_domain_validates_and_defaults():
    pairs = load_pairs(EXAMPLES / "medical.jsonl", max_pairs=2)
    assert pick_domain(pairs, None, Path("x")) == "medical"
    assert pick_domain(pairs, "custom", Path("x")) == "custom"
    for bad in ("../x", "a/b", "a" * 65, ".hidden"):
        with pytest.raises(ValueError, match="invalid domain name"):
            pick_domain(pairs, bad, Path("x"))


def test_pick_domain_refuses_empty_name():
    pairs = load_pairs(EXAMPLES / "medical.jsonl", max_pairs=2)
    with pytest.raises(ValueError, match="it is empty"):
        pick_domain(pairs, "", Path("x"))


def test_cli_align_on_locked_bank_fails_with_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from lifealign_lite.cli.app import app

    bank = Bank(tmp_path / "bank")
    with bank.lock():
        result = CliRunner().invoke(app, ["align", str(EXAMPLES / "medical.jsonl"), "--domain", "medical", "--bank", str(bank.root)])
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.exception!r}"
    assert "being written" in result.stderr and "Traceback" not in result.stderr
    assert "--wait" not in result.stderr or "--wait" in CliRunner().invoke(app, ["align", "--help"]).stdout


# -- what a slot holds, and tau applied once (issue 23), on the tiny model ------------------------------------

def _dense(adapter: dict) -> dict:
    return {name: u.dense() for name, u in adapter.items()}


def _tiny_stream(tiny_model_dir: Path, home: Path, root: Path, domains, **overrides) -> Bank:
    from conftest import align_examples

    recipe = load_recipe("edge-cpu", {"model": str(tiny_model_dir), "router": "base", **OVERRIDES, **overrides})
    return Bank(align_examples(root, home, recipe, domains))


def test_slot_from_base_equals_a_directly_trained_adapter(tiny_model_dir, tmp_path, single_thread):
    """slot_from base with core_from update (the paper's core path): support's slot, aligned after medical (its core
    update trained from medical's core, with replay), is the LoRA that aligning support alone into an empty bank trains
    (same seed, same pairs); its core still carries medical."""
    home = tmp_path / "home"
    stream = _tiny_stream(tiny_model_dir, home, tmp_path / "stream", DOMAINS, core_from="update")
    alone = _tiny_stream(tiny_model_dir, home, tmp_path / "alone", ("support",))
    s, a = stream.load(), alone.load()
    lineage = s.domains["support"]["lineage"][-1]
    assert lineage["trained_from"] == "core v1" and lineage["replayed"] > 0
    assert (stream.root / "runs" / lineage["run"] / "slot").is_dir()  # the slot's own run beside the core's
    slot, direct = _dense(read_adapter(s.slot_dir("support"))[0]), _dense(read_adapter(a.slot_dir("support"))[0])
    run = read_adapter(alone.root / "runs" / a.domains["support"]["lineage"][-1]["run"] / "adapter")[0]
    assert set(slot) == set(direct) == set(run)
    for name in slot:
        assert torch.allclose(slot[name], direct[name], atol=1e-6), name
        assert torch.allclose(direct[name], run[name].dense(), atol=1e-6), name  # the trained LoRA itself, not denoised
    assert any(not torch.allclose(slot[n], _dense(read_adapter(s.core_dir())[0])[n], atol=1e-4) for n in slot)
    # slot_from memory: the old slot, core at the time + the denoised update, differs from the direct adapter
    old = _tiny_stream(tiny_model_dir, home, tmp_path / "memory", DOMAINS, slot_from="memory", core_from="update").load()
    old_slot = _dense(read_adapter(old.slot_dir("support"))[0])
    assert any(not torch.allclose(old_slot[n], direct[n], atol=1e-4) for n in slot)


def test_core_from_slot_trains_once_and_folds_the_slot_into_the_core(tiny_model_dir, tmp_path, single_thread):
    """core_from slot: a new domain after the first trains one LoRA, from the bare base on its own pairs (no replay):
    that LoRA is its slot (equal to aligning it alone) and, through SLMC, the core's update (core v2 = core v1 + its
    consolidated update, with a rank budget that holds both)."""
    from lifealign_lite.memory.consolidate import consolidate_adapter

    home = tmp_path / "home"
    bank = _tiny_stream(tiny_model_dir, home, tmp_path / "stream", DOMAINS, core_from="slot", bank_rank=16, lora_r=4)
    alone = _tiny_stream(tiny_model_dir, home, tmp_path / "alone", ("support",), bank_rank=16, lora_r=4)
    v1, v2, a = bank.load(1), bank.load(2), alone.load()
    lineage = v2.domains["support"]["lineage"][-1]
    assert lineage["trained_from"] == "base" and lineage["replayed"] == 0
    run = bank.root / "runs" / lineage["run"]
    assert not (run / "slot").exists()  # one run, not a core run and a slot run
    slot, direct = _dense(read_adapter(v2.slot_dir("support"))[0]), _dense(read_adapter(a.slot_dir("support"))[0])
    for name in slot:
        assert torch.allclose(slot[name], direct[name], atol=1e-6), name
    recipe = load_recipe("edge-cpu")
    update, _ = consolidate_adapter(read_adapter(run / "adapter")[0], v1.history(), recipe.tau, recipe.projection_gamma)
    core1, core2 = _dense(read_adapter(v1.core_dir())[0]), _dense(read_adapter(v2.core_dir())[0])
    for name, u in update.items():
        assert torch.allclose(core2[name], core1[name] + u.dense(), atol=1e-5), name
    assert len(v2.replay()) > len(v1.replay())  # the buffer still grows (a later core_from update run can replay it)
    with pytest.raises(RecipeError, match="core_from: slot needs"):
        load_recipe("edge-cpu", {"core_from": "slot", "slot_from": "memory"})


def test_tau_acts_once_the_core_is_the_sum_of_consolidated_updates(tiny_model_dir, tmp_path, single_thread):
    """tau denoises each update (SLMC); the core's sum is cut to the rank cap only, never again at tau: with a rank
    budget that holds both tasks, core v2 = core v1 + task 2's consolidated update exactly (the old second cut at
    tau = 0.9 dropped a tenth of the energy at every task)."""
    from lifealign_lite.memory.consolidate import consolidate_adapter, denoise

    recipe_tau = 0.5  # a cut a second application would make plain
    bank = _tiny_stream(tiny_model_dir, tmp_path / "home", tmp_path / "bank", DOMAINS, tau=recipe_tau, bank_rank=16, lora_r=4)
    v1, v2 = bank.load(1), bank.load(2)
    updates = [read_adapter(bank.root / "runs" / v2.domains[d]["lineage"][-1]["run"] / "adapter")[0] for d in DOMAINS]
    first = {n: denoise(u, recipe_tau)[0] for n, u in updates[0].items()}
    core1 = _dense(read_adapter(v1.core_dir())[0])
    for name, u in first.items():
        assert torch.allclose(core1[name], u.dense(), atol=1e-6), name  # denoised once, not twice
    second, _ = consolidate_adapter(updates[1], v1.history(), recipe_tau, load_recipe("edge-cpu").projection_gamma)
    core2 = _dense(read_adapter(v2.core_dir())[0])
    for name, u in second.items():
        assert torch.allclose(core2[name], core1[name] + u.dense(), atol=1e-5), name
