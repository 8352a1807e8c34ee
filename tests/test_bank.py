"""Tests for lifealign_lite.memory.bank: adapters on disk, versions, rollback, damage, locking, replay bound.

No language model is needed: updates are random low-rank factors, and the PEFT check uses a 1-layer Llama
built from a LlamaConfig. Every bank lives in a pytest tmp folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lifealign_lite.memory.replay import update_replay
from lifealign_lite.data import Pair
from lifealign_lite.memory.adapter import STORAGE_DTYPE, BankError, adapter_rank, read_adapter, replace_adapter, write_adapter
from lifealign_lite.memory.bank import Bank, folder_size
from lifealign_lite.memory.state import BankState
from lifealign_lite.memory.consolidate import LowRank

SETTINGS = settings(max_examples=40, deadline=None, database=None, derandomize=True)
HIDDEN = 16
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
TARGETS = ["q_proj", "v_proj"]
BANK_RANK = 4
BASE = {"name": "tiny-llama", "fingerprint": "fp-tiny"}


def lowrank(seed: int, rank: int, d_out: int = HIDDEN, d_in: int = HIDDEN) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g))


def update(seed: int, ranks=(2, 3)) -> dict[str, LowRank]:
    return {name: lowrank(seed * 10 + i, r) for i, (name, r) in enumerate(zip(MODULES, ranks))}


def pair(i: int, domain: str | None) -> Pair:
    return Pair(
        prompt=[{"role": "user", "content": f"question {i} about {domain}"}],
        chosen=[{"role": "assistant", "content": f"good answer {i}"}],
        rejected=[{"role": "assistant", "content": f"bad answer {i}"}],
        domain=domain,
    )


def inode(path: Path) -> int:
    return path.stat().st_ino


def align_like(bank: Bank, parent: BankState, domain: str, seed: int, *, touch_core: bool = True, keys: bool = True) -> BankState:
    """One consolidation as align does it: (re)write core and the domain's slot, key, history and replay."""
    with bank.transaction(parent, f"align {domain}", BASE) as pending:
        if touch_core:
            replace_adapter(pending.folder / "core", update(seed), BANK_RANK, TARGETS, BASE["name"])
        replace_adapter(pending.folder / "slots" / domain, update(seed + 100), BANK_RANK, TARGETS, BASE["name"])
        info = pending.state.domains.setdefault(domain, {"pairs_seen": 0, "lineage": []})
        info["pairs_seen"] += 4
        info["lineage"].append({"seed": seed})
        pending.state.tasks.append(domain)
        pending.state.meta = {"bank_rank": BANK_RANK, "target_modules": TARGETS, "router": "minilm"}
        if keys:
            k = parent.keys()
            k[domain] = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(seed)), dim=1)
            pending.keys = k
        pending.history = parent.history() + [update(seed, ranks=(1, 1))]
        pending.replay = parent.replay() + [pair(seed * 10 + i, domain) for i in range(3)]
    return pending.committed


@pytest.fixture
def synthetic_bank(tmp_path) -> Bank:
    """A bank at version 2 built from random updates, no model: medical (v1), then support (v2)."""
    bank = Bank(tmp_path / "bank")
    s1 = align_like(bank, bank.load(), "medical", seed=1)
    align_like(bank, s1, "support", seed=2)
    return bank


# -- adapters on disk -------------------------------------------------------------------------------------

def test_write_read_round_trip_keeps_slmc_rank_in_16_bit(tmp_path):
    """Each module is stored at its own rank (PEFT's rank_pattern; nothing padded to the bank rank), in 16 bits."""
    upd = update(3, ranks=(2, 3))
    folder = write_adapter(tmp_path / "a", upd, BANK_RANK, TARGETS, "tiny")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 3 < BANK_RANK and config["lora_alpha"] == 3 and config["target_modules"] == sorted(TARGETS)
    assert config["rank_pattern"] == config["alpha_pattern"] == {MODULES[0].replace(".", "\\."): 2}
    assert adapter_rank(folder) == 3
    for name, u in upd.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (u.rank, HIDDEN) and b.shape == (HIDDEN, u.rank) and a.dtype == b.dtype == STORAGE_DTYPE
    back, cfg = read_adapter(folder)
    assert set(back) == set(MODULES) and cfg["r"] == 3
    for name, u in upd.items():
        assert back[name].rank == u.rank and back[name].B.dtype == torch.float32
        dense = u.dense()
        assert float((back[name].dense() - dense).norm() / dense.norm()) < 2e-3  # fp16 rounding of both factors
    # the weights take 2 bytes x ranks 2 + 3, 5/16 of the 4 bytes x bank rank 4 x 2 modules the padded fp32 format took
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored == 2 * HIDDEN * (2 + 3) * 2 == 5 / 16 * len(MODULES) * 2 * HIDDEN * BANK_RANK * 4


def test_old_padded_fp32_adapter_still_reads(tmp_path):
    """Banks written before compact storage hold fp32 factors zero-padded to the bank rank: they read as they are."""
    upd = update(4, ranks=(2, 3))
    folder = tmp_path / "old"
    folder.mkdir()
    tensors = {}
    for name, u in upd.items():
        b, a = torch.zeros(HIDDEN, BANK_RANK), torch.zeros(BANK_RANK, HIDDEN)
        b[:, : u.rank], a[: u.rank] = u.B, u.A
        tensors[f"base_model.model.{name}.lora_B.weight"], tensors[f"base_model.model.{name}.lora_A.weight"] = b, a
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": BANK_RANK, "lora_alpha": BANK_RANK}))
    back, _ = read_adapter(folder)
    for name, u in upd.items():
        torch.testing.assert_close(back[name].dense(), u.dense(), rtol=1e-5, atol=1e-5)


def test_write_adapter_refuses_rank_above_bank_rank(tmp_path):
    with pytest.raises(ValueError, match="exceeds the bank rank"):
        write_adapter(tmp_path / "a", {MODULES[0]: lowrank(0, BANK_RANK + 1)}, BANK_RANK, TARGETS, "tiny")


@pytest.mark.parametrize("use_rslora, expected_scale", [(False, 8 / 2), (True, 8 / 2 ** 0.5)])
def test_read_adapter_folds_lora_scaling_into_b(tmp_path, use_rslora, expected_scale):
    """A PEFT folder with r=2, lora_alpha=8 reads as scale * B @ A (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    u = lowrank(7, 2)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({f"base_model.model.{MODULES[0]}.lora_A.weight": u.A.contiguous(),
               f"base_model.model.{MODULES[0]}.lora_B.weight": u.B.contiguous()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 8, "use_rslora": use_rslora}))
    back, _ = read_adapter(folder)
    torch.testing.assert_close(back[MODULES[0]].dense(), expected_scale * u.dense(), rtol=1e-5, atol=1e-5)


def test_written_adapter_loads_in_peft_with_delta_b_at_a(tmp_path):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        before = base(ids).logits.clone()
    upd = update(5, ranks=(2, 3))
    folder = write_adapter(tmp_path / "a", upd, BANK_RANK, TARGETS, "tiny")
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    for name, u in upd.items():
        module = model.get_submodule(f"base_model.model.{name}")
        delta = module.get_delta_weight("default")
        torch.testing.assert_close(delta, u.dense(), rtol=5e-3, atol=5e-3)
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after), "the loaded adapter must change the model's output"


def test_read_adapter_missing_file_names_path(tmp_path):
    folder = write_adapter(tmp_path / "a", update(1), BANK_RANK, TARGETS, "tiny")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(BankError, match="adapter_config.json: missing"):
        read_adapter(folder)


# -- versions ------------------------------------------------------------------------------------------------

def test_transaction_aborts_on_an_error_and_leaves_the_parent_current(tmp_path):
    bank = Bank(tmp_path / "bank")
    s1 = align_like(bank, bank.load(), "medical", seed=1)
    with pytest.raises(RuntimeError, match="stopped"):
        with bank.transaction(s1, "a failing step", BASE) as pending:
            replace_adapter(pending.folder / "slots" / "support", update(9), BANK_RANK, TARGETS, BASE["name"])
            raise RuntimeError("stopped")
    assert pending.committed is None and not list((bank.root / "versions").glob(".tmp-*"))
    assert Bank(bank.root).load().version == 1 and bank.versions_on_disk() == [1] and bank.verify(1).intact


def test_begin_commit_versions_share_unchanged_files_as_hard_links(tmp_path):
    bank = Bank(tmp_path / "bank")
    s1 = align_like(bank, bank.load(), "medical", seed=1)
    assert s1.version == 1 and (bank.root / "versions" / "000001" / "state.json").is_file()
    # v2 adds a slot but leaves the core and medical's slot untouched, and keeps keys as they are.
    s2 = align_like(bank, s1, "support", seed=2, touch_core=False, keys=False)
    assert s2.version == 2
    v1, v2 = bank.version_dir(1), bank.version_dir(2)
    for rel in ["core/adapter_model.safetensors", "core/adapter_config.json", "slots/medical/adapter_model.safetensors", "keys/medical.safetensors"]:
        assert inode(v1 / rel) == inode(v2 / rel), f"{rel} should be a hard link to the parent's file"
        assert (v2 / rel).stat().st_nlink >= 2
    assert inode(v1 / "history" / "0000.safetensors") == inode(v2 / "history" / "0000.safetensors")  # task 1's update, unchanged
    assert not (v1 / "history" / "0001.safetensors").exists() and (v2 / "history" / "0001.safetensors").stat().st_nlink == 1
    for rel in ["state.json", "replay.jsonl"]:
        assert inode(v1 / rel) != inode(v2 / rel), f"{rel} changed and must be a new file"
    assert (v2 / "slots" / "support" / "adapter_model.safetensors").stat().st_nlink == 1
    assert sorted(s2.domains) == ["medical", "support"] and s2.tasks == ["medical", "support"]
    assert len(s2.history()) == 2 and len(s2.replay()) == 6


def test_rewritten_adapter_gets_new_inode_and_parent_stays_intact(tmp_path):
    bank = Bank(tmp_path / "bank")
    s1 = align_like(bank, bank.load(), "medical", seed=1)
    core_v1 = read_adapter(s1.core_dir())[0]
    bytes_v1 = (s1.core_dir() / "adapter_model.safetensors").read_bytes()
    s2 = align_like(bank, s1, "medical", seed=9)  # rewrites core and medical's slot
    assert inode(s1.core_dir() / "adapter_model.safetensors") != inode(s2.core_dir() / "adapter_model.safetensors")
    assert (s1.core_dir() / "adapter_model.safetensors").read_bytes() == bytes_v1
    again = read_adapter(bank.load(1).core_dir())[0]
    for name in core_v1:
        torch.testing.assert_close(again[name].dense(), core_v1[name].dense())
    assert not torch.allclose(read_adapter(s2.core_dir())[0][MODULES[0]].dense(), core_v1[MODULES[0]].dense())
    assert s2.domains["medical"]["pairs_seen"] == 8 and len(s2.domains["medical"]["lineage"]) == 2


def test_manifest_current_pointer_and_version_log(synthetic_bank):
    manifest = synthetic_bank.manifest()
    assert manifest["current"] == 2
    assert manifest["base"] == BASE
    assert [(v["version"], v["parent"]) for v in manifest["versions"]] == [(1, 0), (2, 1)]
    assert synthetic_bank.load().version == 2
    # No temporary folder is left behind after successful commits.
    assert sorted(p.name for p in (synthetic_bank.root / "versions").iterdir()) == ["000001", "000002"]


def test_rollback_to_earlier_version_then_commit_on_top(synthetic_bank):
    state = synthetic_bank.rollback(1)
    assert state.version == 1 and sorted(state.domains) == ["medical"]
    assert synthetic_bank.manifest()["current"] == 1 and synthetic_bank.load().version == 1
    # Later versions stay on disk; a new commit gets a fresh number and records its true parent.
    assert synthetic_bank.version_dir(2).is_dir()
    s3 = align_like(synthetic_bank, synthetic_bank.load(), "legal", seed=3)
    assert s3.version == 3 and sorted(s3.domains) == ["legal", "medical"]
    assert synthetic_bank.manifest()["versions"][-1]["parent"] == 1
    assert synthetic_bank.rollback(2).version == 2  # rolling forward works too


def test_rollback_to_missing_version_is_refused(synthetic_bank):
    with pytest.raises(BankError, match=r"no version 7 .*versions: 1, 2"):
        synthetic_bank.rollback(7)
    assert synthetic_bank.manifest()["current"] == 2


def test_rollback_to_zero_gives_empty_bank(synthetic_bank):
    assert synthetic_bank.rollback(0).domains == {}
    assert synthetic_bank.load().version == 0


def test_corrupted_state_json_names_file_and_other_versions_still_load(synthetic_bank):
    path = synthetic_bank.version_dir(2) / "state.json"
    path.write_text('{"domains": {"medical": ')
    with pytest.raises(BankError) as info:
        synthetic_bank.load()
    assert str(path) in str(info.value) and "rollback 1" in str(info.value)
    old = synthetic_bank.load(1)
    assert sorted(old.domains) == ["medical"] and read_adapter(old.slot_dir("medical"))[0]
    synthetic_bank.rollback(1)
    assert synthetic_bank.load().version == 1


def test_missing_state_json_is_reported(synthetic_bank):
    (synthetic_bank.version_dir(2) / "state.json").unlink()
    with pytest.raises(BankError, match="state.json: missing"):
        synthetic_bank.load(2)


def test_corrupted_adapter_weights_name_the_path(synthetic_bank):
    state = synthetic_bank.load()
    slot = state.slot_dir("support")  # written in v2 only, so not shared with v1
    weights = slot / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(BankError) as info:
        read_adapter(slot)
    assert str(slot) in str(info.value) and "corrupted" in str(info.value)
    assert read_adapter(state.slot_dir("medical"))[0]  # the other slot is fine


def test_corrupted_keys_and_replay_raise_bank_error(synthetic_bank):
    state = synthetic_bank.load()
    (state.folder / "keys" / "support.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BankError, match="keys/support.safetensors: corrupted"):
        state.keys()
    (state.folder / "replay.jsonl").write_text("{broken\n")
    with pytest.raises(BankError, match="replay.jsonl: corrupted replay buffer"):
        state.replay()


def test_corrupted_manifest_raises_bank_error(synthetic_bank):
    synthetic_bank.manifest_path.write_text("{")
    with pytest.raises(BankError, match="corrupted manifest"):
        synthetic_bank.load()


def test_check_base_refuses_other_fingerprint(synthetic_bank):
    synthetic_bank.check_base(BASE)  # same base: fine
    with pytest.raises(BankError) as info:
        synthetic_bank.check_base({"name": "other-model", "fingerprint": "fp-other"})
    msg = str(info.value)
    assert "tiny-llama" in msg and "fp-tiny" in msg and "other-model" in msg and "--model tiny-llama" in msg
    Bank(synthetic_bank.root.parent / "fresh").check_base({"name": "x", "fingerprint": "y"})  # an empty bank accepts any base


def test_remove_domain_makes_new_version_without_it(synthetic_bank):
    before = synthetic_bank.load()
    state = synthetic_bank.remove_domain("medical", BASE)
    assert state.version == 3 and sorted(state.domains) == ["support"]
    assert not (state.folder / "slots" / "medical").exists()
    assert set(state.keys()) == {"support"}
    assert state.replay() and all(p.domain == "support" for p in state.replay())
    assert state.core_dir() is not None and read_adapter(state.core_dir())[0]
    # The previous version is untouched and can be restored.
    assert (before.folder / "slots" / "medical" / "adapter_model.safetensors").is_file()
    assert "medical" in synthetic_bank.rollback(2).domains


def test_remove_unknown_domain_is_refused_without_new_version(synthetic_bank):
    with pytest.raises(BankError, match="known domains: medical, support"):
        synthetic_bank.remove_domain("legal", BASE)
    assert synthetic_bank.manifest()["current"] == 2
    assert sorted(p.name for p in (synthetic_bank.root / "versions").iterdir()) == ["000001", "000002"]


def test_slot_dir_of_unknown_domain_lists_known_ones(synthetic_bank):
    state = synthetic_bank.load()
    assert state.slot_dir("medical") == state.folder / "slots" / "medical"
    with pytest.raises(BankError, match=r"unknown domain 'legal'; known domains: medical, support"):
        state.slot_dir("legal")
    with pytest.raises(BankError, match="none yet"):
        BankState().slot_dir("medical")


# -- locking -------------------------------------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys
    from lifealign_lite.memory.bank import Bank
    with Bank(sys.argv[1]).lock():
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """
)


def test_lock_held_by_another_process(tmp_path):
    root = tmp_path / "bank"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        bank = Bank(root)
        t0 = time.monotonic()
        with pytest.raises(BankError, match=f"being written by pid {holder.pid}"):
            with bank.lock(wait_s=0):
                pass
        assert time.monotonic() - t0 < 1.0, "wait_s=0 must fail at once"

        # With a wait, the lock is taken once the holder lets go.
        release = threading.Timer(0.7, lambda: (holder.stdin.write("go\n"), holder.stdin.flush()))
        release.start()
        t0 = time.monotonic()
        with bank.lock(wait_s=15):
            waited = time.monotonic() - t0
            assert (root / ".lock").read_text() == f"pid {os.getpid()}"
        release.join()
        assert 0.5 <= waited < 10
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_lock_wait_gives_up_after_deadline(tmp_path):
    root = tmp_path / "bank"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(BankError, match="being written"):
            with Bank(root).lock(wait_s=1.0):
                pass
        assert 0.9 <= time.monotonic() - t0 < 5
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_lock_is_released_after_an_error_inside(tmp_path):
    bank = Bank(tmp_path / "bank")
    with pytest.raises(RuntimeError, match="boom"):
        with bank.lock():
            raise RuntimeError("boom")
    with bank.lock():
        pass
    assert (bank.root / ".lock").read_text() == ""


# -- replay buffer and sizes ---------------------------------------------------------------------------------

@SETTINGS
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=30), min_size=0, max_size=5),
    new=st.integers(min_value=1, max_value=40),
    ratio=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    extra=st.integers(min_value=0, max_value=20),
)
def test_update_replay_stays_bounded_and_keeps_every_domain(sizes, new, ratio, extra):
    buffer = [pair(1000 * d + i, f"d{d}") for d, n in enumerate(sizes) for i in range(n)]
    task = [pair(i, None) for i in range(new)]
    size = len(sizes) + 1 + extra  # room for at least one pair per domain
    out = update_replay(buffer, task, "newdom", ratio, size, seed=0)
    assert len(out) <= size
    domains_in = {f"d{d}" for d in range(len(sizes))} | ({"newdom"} if ratio > 0 else set())
    assert {p.domain for p in out} == domains_in
    import math

    taken = [p for p in out if p.domain == "newdom"]
    assert len(taken) <= math.ceil(ratio * new)
    assert all(p.domain is not None for p in out)
    if len(buffer) + math.ceil(ratio * new) <= size:
        assert len(out) == len(buffer) + math.ceil(ratio * new)  # nothing trimmed while it fits


def test_update_replay_trims_oldest_of_largest_domain():
    buffer = [pair(i, "big") for i in range(10)] + [pair(100, "small")]
    out = update_replay(buffer, [pair(200 + i, None) for i in range(5)], "new", 1.0, 10, seed=0)
    big = [p for p in out if p.domain == "big"]
    assert len(out) == 10 and len(big) == 4
    assert big == buffer[6:10], "the oldest pairs of the largest domain go first"
    assert [p.domain for p in out].count("small") == 1 and [p.domain for p in out].count("new") == 5


def test_folder_size_counts_hard_links_once(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x" * 1000)
    (folder / "b.bin").write_bytes(b"y" * 300)
    os.link(folder / "a.bin", folder / "sub" / "a-link.bin")
    assert folder_size(folder) == 1300


def test_folder_size_of_versions_is_less_than_sum_of_versions(tmp_path):
    bank = Bank(tmp_path / "bank")
    s1 = align_like(bank, bank.load(), "medical", seed=1)
    align_like(bank, s1, "support", seed=2, touch_core=False)
    v1, v2 = folder_size(bank.version_dir(1)), folder_size(bank.version_dir(2))
    total = folder_size(bank.root / "versions")
    shared = (bank.version_dir(1) / "core" / "adapter_model.safetensors").stat().st_size
    assert total <= v1 + v2 - shared
    assert total > max(v1, v2)


def test_router_is_refit_without_a_removed_domain_and_restored_by_rollback(synthetic_bank):
    before = synthetic_bank.load()
    router = before.router()
    assert router.domains == ["medical", "support"]
    support_key = before.keys()["support"]
    state = synthetic_bank.remove_domain("medical", BASE)
    assert (state.folder / "router.safetensors").is_file()  # refit and stored with the new version
    after = state.router()
    assert after.domains == ["support"] and set(state.key_texts()) <= {"support"}
    assert after.route(support_key[0], "", threshold=-1.0).domain == "support"
    restored = synthetic_bank.rollback(before.version)
    assert restored.router().domains == ["medical", "support"]
    assert torch.equal(restored.keys()["medical"], before.keys()["medical"])


# -- compact versions: shared files, gc, old banks ------------------------------------------------------------

def test_rewritten_file_with_same_bytes_is_shared_with_the_parent(tmp_path):
    """A file a new version rewrites with the bytes it had (keys here) is linked back to the parent's copy."""
    bank = Bank(tmp_path / "bank")
    s1 = align_like(bank, bank.load(), "medical", seed=1)
    pending = bank.begin(s1, event="rewrite keys")
    pending.keys = s1.keys()  # the same tensors, written as a new file
    pending.history = s1.history()
    s2 = bank.commit(pending, BASE)
    for rel in ("keys/medical.safetensors", "history/0000.safetensors"):
        assert inode(bank.version_dir(1) / rel) == inode(bank.version_dir(2) / rel), rel
    assert bank.verify(2).intact and bank.verify(1).intact
    assert folder_size(bank.version_dir(2)) < folder_size(bank.root / "versions") < 2 * folder_size(bank.version_dir(1))
    torch.testing.assert_close(s2.keys()["medical"], s1.keys()["medical"])


def test_gc_keeps_newest_and_current_and_frees_only_unshared_files(tmp_path):
    bank = Bank(tmp_path / "bank")
    state = bank.load()
    for seed, domain in enumerate(["a", "b", "c", "d"], start=1):
        state = align_like(bank, state, domain, seed=seed)
    bank.rollback(2)  # current: 2, newest: 4
    slot_a = read_adapter(bank.load(2).slot_dir("a"))[0]
    before = folder_size(bank.root / "versions")
    removed, freed = bank.gc(keep=1)
    assert removed == [1, 3] and freed > 0 and folder_size(bank.root / "versions") == before - freed
    assert sorted(p.name for p in (bank.root / "versions").iterdir()) == ["000002", "000004"]
    assert bank.verify(2).intact and bank.verify(4).intact  # files v2 shared with v1 are still there
    again = read_adapter(bank.load(2).slot_dir("a"))[0]
    for name in slot_a:
        torch.testing.assert_close(again[name].dense(), slot_a[name].dense())
    with pytest.raises(BankError, match="version 3 was removed by `lifealign-lite memory gc`; kept versions: 2, 4"):
        bank.rollback(3)
    assert bank.rollback(4).version == 4 and len(bank.load().history()) == 4
    assert bank.gc(keep=2) == ([], 0)
    with pytest.raises(BankError, match="--keep must be at least 1"):
        bank.gc(keep=0)


def test_bank_with_one_history_file_loads_and_converts_on_its_next_version(tmp_path):
    """A version written before per-task history files (one fp32 history.safetensors) loads, and the next version
    writes the per-task files (without changing what the history holds)."""
    bank = Bank(tmp_path / "bank")
    s1 = align_like(bank, bank.load(), "medical", seed=1)
    v1 = bank.version_dir(1)
    entries = [update(1, ranks=(1, 1)), update(5, ranks=(2, 1))]
    tensors = {f"{i}.{name}.{k}": getattr(u, k) for i, e in enumerate(entries) for name, u in e.items() for k in "BA"}
    save_file(tensors, str(v1 / "history.safetensors"), metadata={"count": "2"})
    import shutil
    shutil.rmtree(v1 / "history")
    old_keys = s1.keys()
    save_file(old_keys, str(v1 / "keys.safetensors"))  # all domains in one file, as before
    shutil.rmtree(v1 / "keys")
    (v1 / "checksums.json").unlink()  # as old banks were: no checksums either
    with pytest.raises(BankError, match="checksums.json: missing"):
        Bank(bank.root).load(1)  # nothing vouches for its files until they are adopted, once and explicitly
    old = Bank(bank.root)
    assert [c.adopted for c in old.adopt()] == [True]
    got = old.load(1).history()
    assert len(got) == 2 and got[1][MODULES[0]].rank == 2
    torch.testing.assert_close(old.load(1).keys()["medical"], old_keys["medical"])
    torch.testing.assert_close(got[1][MODULES[0]].dense(), entries[1][MODULES[0]].dense())
    s2 = align_like(old, old.load(1), "support", seed=2)
    assert not (bank.version_dir(2) / "history.safetensors").exists() and not (bank.version_dir(2) / "keys.safetensors").exists()
    assert sorted(s2.keys()) == ["medical", "support"]
    assert sorted(p.name for p in (bank.version_dir(2) / "history").iterdir()) == ["0000.safetensors", "0001.safetensors", "0002.safetensors"]
    assert len(s2.history()) == 3 and old.verify(2).intact
