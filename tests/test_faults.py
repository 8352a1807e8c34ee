"""Fault injection: hostile inputs, a damaged bank, and a machine that dies mid-align.

Three parts, all on a tiny random Llama saved as a safetensors folder (no download, no real model):

* a table of bad inputs, each run through the real CLI: one-line error (FILE:LINE where a line is at fault),
  exit 2, no traceback and nothing written;
* a corrupted-bank matrix: every kind of bank file truncated or garbled, with and without recorded checksums,
  then `memory list`, `memory show`, `chat`, `eval`, `memory export` and `align` each give one line and exit 2;
* a SIGKILL loop: `align` runs as a subprocess and is killed at random moments (5 times by default, 20 in the
  test marked ``slow``); after every kill the bank opens, verifies, and the earlier versions are byte for byte
  what they were.

Counts for docs/RELIABILITY.md are printed with ``-rP`` (lines starting ``faults:``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer import Exit

from lifealign_lite.memory.replay import REPLAY_MAX_CHARS, update_replay
from lifealign_lite.cli.app import build_recipe
from lifealign_lite.data import Pair
from lifealign_lite.memory.adapter import BankError
from lifealign_lite.memory.bank import Bank
from lifealign_lite.memory.integrity import CHECKSUMS
from lifealign_lite.recipe import RecipeError, load_recipe

from conftest import reaped, require_path
from conftest import invoke_cli as invoke

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CLI = Path(sys.executable).parent / "lifealign-lite"
GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
# Tiny runs: 1 step of 2 pairs, short sequences, the base model's own hidden states as routing embedder.
TINY = ["--max-steps", "1", "--max-pairs", "4", "--batch-size", "2", "--set", "router=base", "--set", "max_length=64",
        "--set", "max_prompt_length=32"]


# -- fixtures ------------------------------------------------------------------------------------------------

def digests(root: Path) -> dict[str, str]:
    """Content of every file under ``root`` except the lock (which every writer rewrites)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_one_line_error(result, *needles: str) -> str:
    text = result.stdout + result.stderr
    assert result.exit_code == 2, f"exit {result.exit_code}: {text[-600:]}"
    assert "Traceback" not in text, text[-1500:]
    lines = result.stderr.strip().splitlines()
    if len(lines) > 1 and lines[0].endswith(" ...") and not lines[0].startswith("error:"):
        lines = lines[1:]  # a slow command's status line said what it was starting; then the error, in one line
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {result.stderr[:800]}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


# -- the recipe: every field checked, from every source ------------------------------------------------------

# (field, a bad value as a string, the flag that sets it or None)
BAD_FIELDS = [
    ("lr", "0", "--lr"), ("lr", "1e30", "--lr"), ("lr", "nan", "--lr"), ("beta", "inf", "--beta"), ("beta", "-1", "--beta"),
    ("focal_gamma", "-0.5", "--focal-gamma"), ("epochs", "inf", "--epochs"), ("epochs", "-1", "--epochs"),
    ("max_steps", "1.5", "--max-steps"), ("max_steps", "-3", "--max-steps"), ("batch_size", "0", "--batch-size"),
    ("batch_size", "abc", "--batch-size"), ("max_pairs", "-1", "--max-pairs"), ("seed", "-1", "--seed"),
    ("quant", "fp8", "--quant"), ("loss", "hinge", "--loss"),
    ("max_grad_norm", "nan", None), ("max_grad_norm", "0", None), ("weight_decay", "-0.1", None), ("grad_accum", "0", None),
    ("warmup_ratio", "1.5", None), ("lora_r", "0", None), ("lora_alpha", "0", None), ("lora_dropout", "1", None),
    ("tau", "0", None), ("projection_gamma", "2", None), ("bank_rank", "0", None), ("replay_ratio", "-0.2", None),
    ("replay_size", "-1", None), ("replay_mix", "1.5", None), ("route_threshold", "3", None), ("route_gate", "1.5", None), ("route_gate", "-0.1", None), ("ewc_lambda", "-1", None),
    ("olora_lambda", "-1", None), ("max_length", "0", None), ("max_prompt_length", "1000", None), ("sft_warmup_steps", "-1", None),
    ("lr_schedule", "step", None), ("reference", "none", None), ("router", "bert", None), ("slot_mode", "x", None), ("slot_from", "core", None), ("core_from", "core", None),
    ("autocast", "fp16", None), ("score_precision", "fp8", None), ("trust_remote_code", "maybe", None), ("replay_all", "2", None),
    ("target_modules", "", None), ("checkpoint_every", "-1", None), ("checkpoint_every", "1.5", None),
]


@pytest.mark.parametrize("key, value, flag", BAD_FIELDS, ids=[f"{k}={v}" for k, v, _ in BAD_FIELDS])
def test_every_recipe_field_is_checked_from_yaml_set_and_flag(tmp_path, key, value, flag):
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text(f"{key}: {value if value else '[]'}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=key):
        load_recipe(str(yaml_file))
    with pytest.raises(Exit) as info:  # build_recipe prints the one-line error and exits 2
        build_recipe(None, [f"{key}={value}"])
    assert info.value.exit_code == 2
    if flag:
        from lifealign_lite.recipe import _coerce

        try:
            flag_value = _coerce(key, value)  # what typer would have parsed for the flag
        except RecipeError:
            return  # typer itself refuses the text for a typed flag
        with pytest.raises(Exit):
            build_recipe(None, [], **{key: flag_value})


def test_good_values_pass_through_every_source(tmp_path):
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text("lr: 2.0e-4\nbatch_size: 3\nseed: 7\n", encoding="utf-8")
    assert build_recipe(str(yaml_file), []).lr == pytest.approx(2e-4)
    assert build_recipe(str(yaml_file), ["lr=3e-4"]).lr == pytest.approx(3e-4)
    assert build_recipe(str(yaml_file), ["lr=3e-4"], lr=4e-4, batch_size=None).lr == pytest.approx(4e-4)
    assert build_recipe(str(yaml_file), ["batch_size=5"], batch_size=None).batch_size == 5


# -- bad inputs through the CLI ------------------------------------------------------------------------------

def _surrogate(tmp):
    line = '{"prompt": "hi \\ud800 there", "chosen": "a", "rejected": "b"}'
    data = write_lines(tmp / "d.jsonl", [GOOD, line])
    return ["align", data], [f"{data}:2:", "surrogate"]


def _huge_int(tmp):
    data = write_lines(tmp / "d.jsonl", ['{"prompt": "q", "chosen": "a", "rejected": "b", "extra": ' + "9" * 5000 + "}"])
    return ["align", data], [f"{data}:1:", "4300"]


def _fifo(tmp):
    os.mkfifo(tmp / "pipe.jsonl")
    return ["align", tmp / "pipe.jsonl"], ["pipe.jsonl", "not a regular file"]


def _cr_only(tmp):
    data = tmp / "d.jsonl"
    data.write_bytes(b"\r".join(json.dumps(GOOD).encode() for _ in range(3)) + b"\r")
    return ["align", data], [f"{data}:1:", "carriage returns"]


def _bad_yaml_utf8(tmp):
    (tmp / "r.yaml").write_bytes(b"lr: 1.0e-4\ndescription: caf\xe9\n")
    return ["align", write_lines(tmp / "d.jsonl", [GOOD]), "--recipe", tmp / "r.yaml"], ["r.yaml", "not valid UTF-8"]


def _reserved_domain(tmp):
    return ["align", write_lines(tmp / "d.jsonl", [GOOD]), "--domain", "core"], ["'core' is reserved"]


def _missing_model(tmp):
    return ["align", write_lines(tmp / "d.jsonl", [GOOD]), "--model", "/nonexistent/dir"], ["/nonexistent/dir", "does not exist"]


def _chat_zero_tokens(tmp):
    return ["chat", "--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]


def _chat_negative_tokens(tmp):
    return ["chat", "--prompt", "hi", "--max-new-tokens", "-5"], ["--max-new-tokens", "-5"]


def _rm_without_bank(tmp):
    return ["memory", "rm", "medical"], ["no adapter bank there"]


def _rollback_without_bank(tmp):
    return ["memory", "rollback", "1"], ["no adapter bank there"]


def _verify_without_bank(tmp):
    return ["memory", "verify"], ["no adapter bank there"]


def _resume_without_bank(tmp):
    return ["align", write_lines(tmp / "d.jsonl", [GOOD]), "--resume"], ["nothing to resume"]


def _set_nan(tmp):
    return ["align", write_lines(tmp / "d.jsonl", [GOOD]), "--set", "max_grad_norm=nan"], ["max_grad_norm"]


def _flag_huge_lr(tmp):
    return ["align", write_lines(tmp / "d.jsonl", [GOOD]), "--lr", "1e30"], ["lr must be in (0, 1]"]


NO_BANK_CASES = {
    "lone-surrogate": _surrogate, "5000-digit-integer": _huge_int, "fifo-data-file": _fifo, "cr-only-lines": _cr_only,
    "recipe-not-utf8": _bad_yaml_utf8, "domain-core": _reserved_domain, "missing-model-folder": _missing_model,
    "chat-max-new-tokens-0": _chat_zero_tokens, "chat-max-new-tokens-negative": _chat_negative_tokens,
    "rm-without-bank": _rm_without_bank, "rollback-without-bank": _rollback_without_bank,
    "verify-without-bank": _verify_without_bank, "resume-without-bank": _resume_without_bank, "set-max-grad-norm-nan": _set_nan, "flag-lr-1e30": _flag_huge_lr,
}


@pytest.mark.parametrize("case", list(NO_BANK_CASES))
def test_bad_input_without_a_bank_is_one_line_and_creates_nothing(case, tmp_path):
    home, bank = tmp_path / "home", tmp_path / "bank"
    args, needles = NO_BANK_CASES[case](tmp_path)
    result = invoke([*args, "--bank", bank], home)
    assert_one_line_error(result, *needles)
    assert not bank.exists(), f"{case} created {bank}"
    assert not (home / "models").exists()


def test_a_thousand_bad_lines_print_the_capped_count(tmp_path):
    from lifealign_lite.errors import MAX_SHOWN_PROBLEMS

    data = write_lines(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a"}] * 1000)
    result = invoke(["align", data, "--bank", tmp_path / "bank"], tmp_path / "home")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == MAX_SHOWN_PROBLEMS + 1 and lines[-1] == f"... and {1000 - MAX_SHOWN_PROBLEMS} more problems"
    assert lines[0].startswith(f"error: {data}:1:") and not (tmp_path / "bank").exists()


def _export_to_file(bank, tmp):
    (tmp / "taken").write_text("x")
    return ["memory", "export", "medical", tmp / "taken"], ["taken", "not a folder"]


def _export_into_bank(bank, tmp):
    return ["memory", "export", "medical", bank.version_dir(2) / "copy"], ["inside the bank"]


def _manifest_missing_version(bank, tmp):
    manifest = bank.manifest()
    manifest["current"] = 6
    bank.manifest_path.write_text(json.dumps(manifest))
    return ["memory", "list"], ["000006", "memory rollback 2"]


def _slot_pickle(bank, tmp):
    (bank.version_dir(2) / "slots" / "support" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    return ["memory", "list"], ["adapter_model.bin", "safetensors only", "memory rollback 1"]


def _unknown_domain_export(bank, tmp):
    return ["memory", "export", "legal", tmp / "out"], ["unknown domain 'legal'"]


BANK_CASES = {"export-to-a-file": _export_to_file, "export-into-the-bank": _export_into_bank,
              "manifest-points-at-missing-version": _manifest_missing_version, "pickle-weights-in-a-slot": _slot_pickle,
              "export-unknown-domain": _unknown_domain_export}


@pytest.mark.parametrize("case", list(BANK_CASES))
def test_bad_input_with_a_bank_is_one_line_and_writes_nothing(case, tiny_two_domain_copy, tmp_path):
    bank = tiny_two_domain_copy
    args, needles = BANK_CASES[case](bank, tmp_path)
    before = digests(bank.root)
    result = invoke([*args, "--bank", bank.root], tmp_path / "home")
    assert_one_line_error(result, *needles)
    assert digests(bank.root) == before


def test_eval_lone_surrogate_names_file_and_line(tiny_two_domain_copy, tmp_path, tiny_model_dir):
    bank = tiny_two_domain_copy
    data = write_lines(tmp_path / "d.jsonl", [GOOD, '{"prompt": "\\udfff", "chosen": "a", "rejected": "b"}'])
    result = invoke(["eval", data, "--domain", "medical", "--model", tiny_model_dir, "--bank", bank.root], tmp_path / "home")
    assert_one_line_error(result, f"{data}:2:", "surrogate")


def test_replay_buffer_clips_huge_pairs():
    huge = Pair(prompt=[{"role": "user", "content": "p" * 100_000 + "END"}], chosen=[{"role": "assistant", "content": "START" + "c" * 100_000}],
                rejected=[{"role": "assistant", "content": "r"}])
    out = update_replay([], [huge], "big", 1.0, 10, seed=0)
    stored = out[0]
    assert len(stored.prompt[0]["content"]) == REPLAY_MAX_CHARS and stored.prompt[0]["content"].endswith("END")
    assert len(stored.chosen[0]["content"]) == REPLAY_MAX_CHARS and stored.chosen[0]["content"].startswith("START")
    assert stored.rejected == huge.rejected


# -- the corrupted-bank matrix -------------------------------------------------------------------------------

DAMAGED_FILES = ["manifest.json", "state.json", CHECKSUMS, "core/adapter_model.safetensors", "core/adapter_config.json",
                 "slots/support/adapter_model.safetensors", "slots/support/adapter_config.json", "keys/support.safetensors",
                 "key_texts.json", "router.safetensors", "history/0001.safetensors", "replay.jsonl"]
LEGACY_EDITS = {  # damage that parses as JSON but is not a bank file: found by the structure checks `memory verify --adopt` runs
    "state.json {}": ("state.json", b"{}"),
    "pairs_seen null": ("state.json", None),
}


def damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
        return
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # garble: the same size, other bytes
        path.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(max(len(data), 16))))


def commands(bank: Bank, tmp: Path, tiny_model: Path, data: Path) -> dict[str, list]:
    model = ["--model", tiny_model]
    return {
        "list": ["memory", "list", "--bank", bank.root],
        "show": ["memory", "show", "medical", "--bank", bank.root],
        "chat": ["chat", "--prompt", "hello", "--domain", "medical", "--max-new-tokens", "2", "--bank", bank.root, *model],
        "eval": ["eval", data, "--domain", "medical", "--max-pairs", "2", "--bank", bank.root, *model],
        "export": ["memory", "export", "medical", tmp / "export", "--bank", bank.root],
        "align": ["align", data, "--domain", "medical", "--bank", bank.root, *model, *TINY],
    }


def run_matrix(bank: Bank, tmp: Path, tiny_model: Path, rel: str, what: str) -> int:
    data = EXAMPLES / "medical.jsonl"
    before = digests(bank.root)
    runs = sorted((bank.root / "runs").iterdir())
    tried = 0
    for name, args in commands(bank, tmp, tiny_model, data).items():
        result = invoke(args, tmp / "home")
        line = assert_one_line_error(result)
        assert Path(rel).name in line, f"{name} after {what} of {rel}: {line}"
        if rel != "manifest.json":
            assert "version" in line and ("memory rollback" in line or "memory verify" in line), line
        assert digests(bank.root) == before, f"{name} wrote into the bank after {what} of {rel}"
        assert sorted((bank.root / "runs").iterdir()) == runs and not (tmp / "export").exists()
        tried += 1
    return tried


# (file, how): every file truncated and garbled, and the two files whose absence used to pass for intact: a deleted
# manifest (align started the bank over) and a deleted checksums.json (the version was "unverified" and used)
MATRIX = [(rel, how) for rel in DAMAGED_FILES for how in ("truncate", "garble")] + [("manifest.json", "delete"), (CHECKSUMS, "delete")]


@pytest.mark.parametrize("rel,how", MATRIX)
def test_damaged_bank_file_stops_every_command_with_one_line(tiny_two_domain_copy, tmp_path, tiny_model_dir, rel, how):
    bank = tiny_two_domain_copy
    path = bank.root / rel if rel == "manifest.json" else bank.version_dir(2) / rel
    damage(path, how)
    tried = run_matrix(bank, tmp_path, tiny_model_dir, rel, how)
    if rel == "manifest.json":
        assert "memory repair" in invoke(["memory", "list", "--bank", bank.root], tmp_path / "home").stderr
    else:
        line = bank.way_out(2)
        assert "rollback 1" in line, line  # support's slot and every file rewritten in v2 leave v1 intact
    verify = invoke(["memory", "verify", "--all", "--bank", bank.root], tmp_path / "home")
    assert verify.exit_code == 1 and rel in verify.stdout + verify.stderr and "Traceback" not in verify.stdout + verify.stderr, verify.output
    print(f"faults: matrix {rel} {how}: {tried} commands, tracebacks 0")


@pytest.mark.parametrize("damaged", ["deleted", "garbled", "not a manifest ([])"])
def test_memory_repair_rebuilds_the_manifest_from_the_versions_that_verify(tiny_two_domain_copy, tmp_path, damaged):
    bank = tiny_two_domain_copy
    versions = json.loads(bank.manifest_path.read_text())["versions"]
    if damaged == "deleted":
        bank.manifest_path.unlink()
    else:
        bank.manifest_path.write_bytes(b"[]" if damaged.endswith("([])") else b"\x00garbled{")
    old = bank.manifest_path.read_bytes() if bank.manifest_path.exists() else None
    result = invoke(["memory", "repair", "--bank", bank.root], tmp_path / "home")
    assert result.exit_code == 0 and "versions 1, 2, current 2" in result.stderr, result.output
    manifest = Bank(bank.root).manifest()
    assert manifest["current"] == 2 and [v["version"] for v in manifest["versions"]] == [1, 2, 2]
    assert [v["event"] for v in manifest["versions"][:2]] == [v["event"] for v in versions]
    assert manifest["base"]["fingerprint"] == json.loads((bank.version_dir(2) / "state.json").read_text())["base"]["fingerprint"]
    kept = sorted(bank.root.glob("manifest.json.damaged-*"))
    assert ([p.read_bytes() for p in kept] == [old]) if old is not None else not kept  # the damaged manifest is kept aside, not lost
    assert invoke(["memory", "rollback", "1", "--bank", bank.root], tmp_path / "home").exit_code == 0
    assert Bank(bank.root).load().version == 1
    again = invoke(["memory", "repair", "--bank", bank.root], tmp_path / "home")
    assert again.exit_code == 0 and "nothing to repair" in again.stderr


def test_memory_repair_leaves_out_damaged_versions_and_takes_the_base_from_a_run(tiny_two_domain_copy, tmp_path):
    """A version that does not verify is not listed (verify --all still shows it); a version written before
    state.json recorded the base model gets it from the summary of the run it consolidated."""
    bank = tiny_two_domain_copy
    base = bank.manifest()["base"]
    for v in (1, 2):
        state = json.loads((bank.version_dir(v) / "state.json").read_text())
        del state["base"]
        (bank.version_dir(v) / "state.json").write_text(json.dumps(state))  # as older banks were; the checksum no longer matches
    assert invoke(["memory", "verify", "--adopt", "--bank", bank.root], tmp_path / "home").exit_code == 1  # nothing to adopt: damaged
    for v in (1, 2):
        (bank.version_dir(v) / CHECKSUMS).unlink()
    assert invoke(["memory", "verify", "--adopt", "--bank", bank.root], tmp_path / "home").exit_code == 0
    damage(bank.version_dir(2) / "router.safetensors", "truncate")
    bank.manifest_path.unlink()
    result = invoke(["memory", "repair", "--bank", bank.root], tmp_path / "home")
    assert result.exit_code == 0 and "versions 1, current 1" in result.stderr and "left out as damaged: 2" in result.stderr, result.output
    assert Bank(bank.root).manifest()["base"] == base
    assert sorted(Bank(bank.root).load().domains) == ["medical"]


def test_memory_repair_refuses_when_no_version_verifies(tiny_two_domain_copy, tmp_path):
    bank = tiny_two_domain_copy
    for v in (1, 2):
        (bank.version_dir(v) / CHECKSUMS).unlink()
    bank.manifest_path.unlink()
    before = digests(bank.root)
    assert_one_line_error(invoke(["memory", "repair", "--bank", bank.root], tmp_path / "home"), "no version on disk verifies", "--adopt")
    assert digests(bank.root) == before


@pytest.mark.parametrize("case", ["truncate core", "truncate slot", "garble keys", "garble adapter_config", "truncate history",
                                  "garble replay", *LEGACY_EDITS])
def test_adopt_records_checksums_only_for_versions_whose_files_parse(tiny_two_domain_copy, tmp_path, tiny_model_dir, case):
    """A bank written before checksums existed is damaged until `memory verify --adopt` records them, which it does
    only for a version whose every file parses as what its name says; damage there keeps the version refused."""
    bank = tiny_two_domain_copy
    for v in (1, 2):
        (bank.version_dir(v) / CHECKSUMS).unlink()
    files = {"core": "core/adapter_model.safetensors", "slot": "slots/support/adapter_model.safetensors", "keys": "keys/support.safetensors",
             "adapter_config": "slots/support/adapter_config.json", "history": "history/0001.safetensors", "replay": "replay.jsonl"}
    if case in LEGACY_EDITS:
        rel, content = LEGACY_EDITS[case]
        path = bank.version_dir(2) / rel
        if content is None:
            state = json.loads(path.read_text())
            state["domains"]["medical"]["pairs_seen"] = None
            content = json.dumps(state).encode()
        path.write_bytes(content)
    else:
        how, kind = case.split()
        rel = files[kind]
        damage(bank.version_dir(2) / rel, how)
    result = invoke(["memory", "verify", "--adopt", "--bank", bank.root], tmp_path / "home")
    assert result.exit_code == 1 and rel in result.stdout and "checksums recorded now" in result.stdout, result.output
    assert (bank.version_dir(1) / CHECKSUMS).is_file() and not (bank.version_dir(2) / CHECKSUMS).exists()
    run_matrix(bank, tmp_path, tiny_model_dir, CHECKSUMS, case)


def test_a_version_without_checksums_is_damaged_until_adopted(tiny_two_domain_copy, tmp_path):
    """Changed on purpose (issue 26): a version whose checksums.json is gone used to open as "unverified"; now it is
    damaged (nothing vouches for its files) until `memory verify --adopt` records them, explicitly."""
    bank = tiny_two_domain_copy
    result = invoke(["memory", "verify", "--all", "--bank", bank.root], tmp_path / "home")
    assert result.exit_code == 0 and result.stdout.count(" ok ") == 2, result.stdout
    sums = json.loads((bank.version_dir(2) / CHECKSUMS).read_text())["files"]
    v1 = json.loads((bank.version_dir(1) / CHECKSUMS).read_text())["files"]
    assert set(sums) == {str(p.relative_to(bank.version_dir(2))) for p in bank.version_dir(2).rglob("*") if p.is_file() and p.name != CHECKSUMS}
    assert sums["slots/medical/adapter_model.safetensors"] == v1["slots/medical/adapter_model.safetensors"]  # shared with v1
    (bank.version_dir(2) / CHECKSUMS).unlink()
    result = invoke(["memory", "verify", "--bank", bank.root], tmp_path / "home")
    assert result.exit_code == 1 and "--adopt" in result.stdout, result.stdout
    with pytest.raises(BankError, match=r"checksums.json: missing .*--adopt.* version 2 is damaged; .*rollback 1"):
        Bank(bank.root).load()
    result = invoke(["memory", "verify", "--adopt", "--bank", bank.root], tmp_path / "home")
    assert result.exit_code == 0 and "checksums recorded now" in result.stdout, result.stdout
    assert json.loads((bank.version_dir(2) / CHECKSUMS).read_text())["files"] == sums
    assert Bank(bank.root).load().version == 2


def test_new_file_in_a_version_is_covered(tiny_two_domain_copy):
    """Whatever a version holds is recorded: a file kind the bank does not know yet too."""
    bank = tiny_two_domain_copy
    state = bank.load()
    pending = bank.begin(state, event="new kind of file")
    (pending.folder / "future-weights.safetensors").write_bytes(b"0" * 64)
    committed = bank.commit(pending, bank.manifest()["base"])
    assert "future-weights.safetensors" in json.loads((committed.folder / CHECKSUMS).read_text())["files"]
    (committed.folder / "future-weights.safetensors").write_bytes(b"1" * 64)
    with pytest.raises(BankError, match=r"future-weights.safetensors: content differs .* version 3 is damaged; .*rollback 2"):
        Bank(bank.root).load()


# -- SIGKILL loop ----------------------------------------------------------------------------------------------

def kill_loop(bank: Bank, tiny_model: Path, home: Path, tmp: Path, kills: int, seed: int) -> dict:
    """Kill `align` ``kills`` times at random moments (any time after start, at the adapter save, inside the
    version commit); after each: no traceback, the bank opens and verifies, earlier versions unchanged."""
    rng = random.Random(seed)
    env = dict(os.environ, LIFEALIGN_HOME=str(home), OMP_NUM_THREADS="1", COLUMNS="200")
    frozen = {v: digests(bank.version_dir(v)) for v in (1, 2)}
    counts = {"killed": 0, "finished": 0, "runs": 0, "in commit": 0}
    domains = ["medical", "support", "extra"]
    orphans: set[int] = set()  # complete versions a kill left unlisted (between the rename and the manifest)
    i = -1
    while counts["killed"] < kills and counts["runs"] < 2 * kills:  # a kill in the commit window may come after the exit
        i += 1
        domain = domains[i % 3]
        data = EXAMPLES / ("support.jsonl" if domain == "support" else "medical.jsonl")
        mode = ("anytime", "adapter saved", "commit")[i % 3]
        log = tmp / f"align-{i}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([str(CLI), "align", str(data), "--domain", domain, "--bank", str(bank.root), "--model", str(tiny_model),
                                     *TINY, "--seed", str(i)], env=env, stdout=fh, stderr=subprocess.STDOUT)
        with reaped(proc):
            deadline = time.monotonic() + 300
            if mode == "anytime":
                time.sleep(rng.uniform(0.5, 14.0))
            else:
                marker = "runs/*/adapter/adapter_model.safetensors" if mode == "adapter saved" else "versions/.tmp-*"
                seen = {str(p) for p in bank.root.glob(marker)}
                while proc.poll() is None and not ({str(p) for p in bank.root.glob(marker)} - seen):
                    assert time.monotonic() < deadline, "align did not get there in time"
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        counts["runs"] += 1
        counts["killed" if proc.returncode == -signal.SIGKILL else "finished"] += 1
        listed = {v["version"] for v in Bank(bank.root).manifest()["versions"]}
        on_disk = {int(p.name) for p in (bank.root / "versions").iterdir() if p.name.isdigit()}
        if proc.returncode == -signal.SIGKILL and (list((bank.root / "versions").glob(".tmp-*")) or on_disk - listed - orphans):
            counts["in commit"] += 1  # killed while the version was written (a temporary or an unlisted folder is left)
        orphans |= on_disk - listed
        text = log.read_text()
        where = f"kill {i} ({mode}): return code {proc.returncode}; log: {text[-600:]}"
        assert proc.returncode in (0, -signal.SIGKILL), where
        assert "Traceback" not in text, where
        fresh = Bank(bank.root)
        state = fresh.load()  # opens and verifies the current version
        assert state.version >= 2 and {"medical", "support"} <= set(state.domains), where
        for v in (1, 2):
            assert digests(bank.version_dir(v)) == frozen[v], f"version {v} changed; {where}"
        result = invoke(["memory", "verify", "--all", "--bank", bank.root], home)
        assert result.exit_code == 0, f"{result.stdout}\n{where}"
    # The lock died with the last process: the bank takes a new version on top of what the kills left.
    fresh = Bank(bank.root)
    with fresh.lock(wait_s=0):
        committed = fresh.commit(fresh.begin(fresh.load(), event="after the kills"), fresh.manifest()["base"])
    assert Bank(bank.root).load().version == committed.version and not list((bank.root / "versions").glob(".tmp-*"))
    return counts


def _kill_test(bank, tiny_model, home, tmp_path, kills):
    require_path(CLI, "the lifealign-lite console script")
    seed = int(os.environ.get("FAULTS_SEED") or time.time_ns() % 10_000)
    print(f"faults: sigkill seed {seed} (replay this run with FAULTS_SEED={seed})")  # shown with a failure too
    counts = kill_loop(bank, tiny_model, home, tmp_path, kills, seed)
    print(f"faults: sigkill seed {seed}: {counts['runs']} runs, {counts['killed']} killed ({counts['in commit']} inside the version commit), "
          f"{counts['finished']} finished first, "
          f"bank at version {Bank(bank.root).load().version}, tracebacks 0")
    assert counts["killed"] >= kills, counts


def test_sigkill_align_at_random_moments(tiny_two_domain_copy, tiny_model_dir, home, tmp_path):
    _kill_test(tiny_two_domain_copy, tiny_model_dir, home, tmp_path, kills=5)


@pytest.mark.slow
def test_sigkill_align_at_random_moments_many(tiny_two_domain_copy, tiny_model_dir, home, tmp_path):
    _kill_test(tiny_two_domain_copy, tiny_model_dir, home, tmp_path, kills=20)
