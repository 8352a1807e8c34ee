"""Chatting with the bank's memory, and the CLI around it: chat, route, memory list/export, domain-name checks.

The integration tests share one two-domain bank (medical v1, support v2; tiny runs of the real default model),
built once per session: the same builder as tests/test_lifelong.py, in the session's base temp folder.
Only `chat --prompt` runs as a real subprocess (its stdout must be the answer alone); the other commands run
in-process through typer's CliRunner, which keeps stdout and stderr apart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lifealign_lite.memory.adapter import BankError, read_adapter
from lifealign_lite.memory.bank import Bank
from lifealign_lite.recipe import load_recipe

from conftest import invoke_cli as invoke
from conftest import require, require_path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CLI = Path(sys.executable).parent / "lifealign-lite"
# Tiny runs (the CPU is shared): 2 optimizer steps of 2 pairs, 8 pairs per task.
PAIRS = 8  # per domain in the two_domain_bank fixture (conftest.py)
MEDICAL_PROMPT = "I have a mild headache. Can I take ibuprofen?"
SUPPORT_PROMPT = "I forgot my password and the reset email never arrived. How do I get back into my account?"
TOKENS = 12


# -- ChatSession ---------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_ask_with_medical_memory(torch_session):
    assert torch_session.available() == ["medical", "support", "core", "base"]
    turn = torch_session.ask(MEDICAL_PROMPT, max_new_tokens=TOKENS)
    assert turn.text.strip() and turn.memory == "medical" and turn.route is None
    assert torch_session.active == "medical" and 0 < turn.tokens <= TOKENS + 2
    assert torch_session.history[-1] == {"role": "assistant", "content": turn.text}


@pytest.mark.integration
def test_cli_chat_prints_only_the_answer(torch_session, two_domain_bank, lifealign_home):
    require_path(CLI, "the lifealign-lite console script")
    torch_session.history = []
    torch_session.set_domain("medical")
    expected = torch_session.ask(MEDICAL_PROMPT, max_new_tokens=TOKENS, keep_history=False).text
    # --engine torch: the answer is compared token for token with the torch session above; where llama-cpp-python is
    # installed the default engine is llama.cpp, whose Q4_1 x int8 arithmetic splits near-tied greedy choices
    # (tests/test_llamacpp.py compares the two engines by top-1 agreement instead)
    proc = subprocess.run(
        [str(CLI), "chat", "--prompt", MEDICAL_PROMPT, "--domain", "medical", "--bank", str(two_domain_bank), "--max-new-tokens", str(TOKENS),
         "--engine", "torch"],
        env=dict(os.environ, LIFEALIGN_HOME=str(lifealign_home)), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == expected, f"stdout should be the answer alone; stderr: {proc.stderr[-500:]}"
    assert "memory: medical" in proc.stderr and "engine: torch" in proc.stderr


@pytest.mark.integration
def test_set_unknown_domain_lists_known_ones(torch_session):
    before = torch_session.domain
    with pytest.raises(BankError, match=r"unknown domain 'nope'; known domains: medical, support"):
        torch_session.set_domain("nope")
    assert torch_session.domain == before


@pytest.mark.integration
def test_auto_routing_sends_support_prompt_to_support(torch_session):
    torch_session.history = []
    torch_session.set_domain("auto")
    turn = torch_session.ask(SUPPORT_PROMPT, max_new_tokens=4, keep_history=False)
    assert turn.memory == "support" and turn.route is not None and turn.route.domain == "support"
    assert turn.route.scores["support"] > turn.route.scores["medical"]
    assert torch_session.active == "support"
    # Switching back unmerges support and merges medical: the answer is the medical one again.
    torch_session.set_domain("medical")
    again = torch_session.ask(MEDICAL_PROMPT, max_new_tokens=TOKENS, keep_history=False)
    assert again.memory == "medical" and again.text.strip()


# -- CLI -----------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_cli_chat_unknown_domain_fails_with_known_domains(two_domain_bank, lifealign_home):
    result = invoke(["chat", "--prompt", "hi", "--domain", "unknown", "--bank", str(two_domain_bank)], lifealign_home)
    assert result.exit_code != 0 and result.stdout == ""
    assert "unknown domain 'unknown'" in result.stderr and "medical, support" in result.stderr


@pytest.mark.integration
def test_cli_memory_list_json(two_domain_bank, lifealign_home):
    result = invoke(["memory", "list", "--json", "--bank", str(two_domain_bank)], lifealign_home)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["version"] == 2 and data["bank_bytes"] > 0
    entries = {e["domain"]: e for e in data["entries"]}
    assert set(entries) == {"medical", "support", "core"}
    assert entries["medical"]["pairs_seen"] == PAIRS and entries["support"]["pairs_seen"] == PAIRS
    assert entries["core"]["pairs_seen"] == 2 * PAIRS and entries["core"]["versions"] == 2
    assert all(e["size_bytes"] > 0 for e in entries.values())


@pytest.mark.integration
def test_cli_route_json(two_domain_bank, lifealign_home):
    result = invoke(["route", SUPPORT_PROMPT, "--json", "--bank", str(two_domain_bank)], lifealign_home)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data["scores"], dict) and set(data["scores"]) == {"medical", "support"}
    assert data["domain"] == "support" and data["scores"]["support"] >= data["threshold"]


def _base_tensor(home: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    from lifealign_lite.model import default_model_dir

    with safe_open(str(default_model_dir(home) / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


@pytest.mark.integration
def test_cli_export_merged_loads_in_transformers(two_domain_bank, lifealign_home, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = invoke(["memory", "export", "medical", str(out), "--format", "merged", "--bank", str(two_domain_bank)], lifealign_home)
    assert result.exit_code == 0, result.stderr
    assert "checked" in result.stderr
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert AutoTokenizer.from_pretrained(out).chat_template
    module = "model.layers.0.self_attn.q_proj"
    delta = read_adapter(Bank(two_domain_bank).load().slot_dir("medical"))[0][module].dense()
    merged = model.get_submodule(module).weight.detach()
    torch.testing.assert_close(merged, _base_tensor(lifealign_home, f"{module}.weight") + delta, rtol=1e-5, atol=1e-6)
    # A second export into the now non-empty folder is refused.
    again = invoke(["memory", "export", "medical", str(out), "--format", "peft", "--bank", str(two_domain_bank)], lifealign_home)
    assert again.exit_code == 2 and "not empty" in again.stderr


@pytest.mark.integration
def test_cli_export_peft_loads_in_peft(two_domain_bank, lifealign_home, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lifealign_lite.model import default_model_dir

    out = tmp_path / "peft"
    result = invoke(["memory", "export", "medical", str(out), "--format", "peft", "--bank", str(two_domain_bank)], lifealign_home)
    assert result.exit_code == 0, result.stderr
    slot = Bank(two_domain_bank).load().slot_dir("medical")
    assert (out / "adapter_model.safetensors").read_bytes() == (slot / "adapter_model.safetensors").read_bytes()
    # the base it names is the converted embedded model in the model cache, and the tokenizer travels with it
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(default_model_dir(lifealign_home))
    assert (out / "tokenizer_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(default_model_dir(lifealign_home), use_safetensors=True)
    model = PeftModel.from_pretrained(base, str(out))
    module = "model.layers.0.self_attn.q_proj"
    delta = model.get_submodule(f"base_model.model.{module}").get_delta_weight("default")
    torch.testing.assert_close(delta, read_adapter(slot)[0][module].dense(), rtol=1e-4, atol=1e-6)


# -- domain names (no model: the names must be refused before anything is loaded) ----------------------------

@pytest.mark.parametrize("name", [
    "../x",
    "a/b",
    "",
    "a" * 65,
])
def test_cli_align_refuses_bad_domain_names(name, tmp_path):
    bank = Bank(tmp_path / "bank")
    bank.root.mkdir()
    # Held lock: should a bad name get through, align stops at the lock instead of training into the bank.
    with bank.lock():
        before = sorted(p.name for p in bank.root.rglob("*"))
        result = invoke(["align", str(EXAMPLES / "medical.jsonl"), "--domain", name, "--bank", str(bank.root), "--max-steps", "1"], tmp_path / "home")
        after = sorted(p.name for p in bank.root.rglob("*"))
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.exception!r}"
    assert "invalid domain name" in result.stderr
    assert after == before == [".lock"]


# -- interactive chat in a terminal (tiny model: the answer never ends by itself) -----------------------------

def _spawn_chat(tiny_bank, tiny_model_dir, tmp_path, *extra):
    pexpect = require("pexpect")
    require_path(CLI, "the lifealign-lite console script")
    env = dict(os.environ, LIFEALIGN_HOME=str(tmp_path / "home"), TERM="xterm", COLUMNS="120")
    args = ["chat", "--bank", str(tiny_bank), "--model", str(tiny_model_dir), "--domain", "medical", *extra]
    # a pytest started in the background (`cmd &` in a script) ignores SIGINT, and the child would inherit that
    return pexpect.spawn(str(CLI), args, env=env, encoding="utf-8", timeout=120, dimensions=(40, 120),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_stops_the_answer_and_returns_to_the_prompt(tiny_bank, tiny_model_dir, tmp_path):
    child = _spawn_chat(tiny_bank, tiny_model_dir, tmp_path, "--max-new-tokens", "100000")
    child.expect_exact("loading the model")  # a status line before the silent load
    child.expect_exact("[medical] you> ")
    child.sendline("Tell me a very long story.")
    child.expect_exact("assistant>")
    child.expect(r"[a-z]{3}")  # the answer is streaming (escape sequences have no three letters in a row)
    started = time.monotonic()
    child.sendintr()
    child.expect_exact("stopped", timeout=30)
    child.expect_exact("[medical] you> ", timeout=30)
    assert time.monotonic() - started < 30
    child.sendline("/bye")
    child.expect(pexpect_eof(), timeout=60)
    child.close()
    assert child.exitstatus == 0


def test_line_editing_history_and_commands(tiny_bank, tiny_model_dir, tmp_path):
    child = _spawn_chat(tiny_bank, tiny_model_dir, tmp_path)
    child.expect_exact("[medical] you> ")
    child.send("/domn\x1b[Dai\r")  # left arrow, then insert: "/domain" only with line editing
    child.expect_exact("memory: medical")
    child.expect_exact("you> ")
    child.send("\x1b[A\r")  # up arrow recalls "/domain"
    child.expect_exact("memory: medical")
    child.sendline("/help")
    child.expect_exact("/bye")
    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense")
    child.sendline("/domain nope")
    child.expect_exact("unknown domain 'nope'")
    child.sendline("/exit")
    child.expect(pexpect_eof(), timeout=60)
    child.close()
    assert child.exitstatus == 0
    assert "/domain" in (tmp_path / "home" / "chat_history").read_text()


def pexpect_eof():
    import pexpect

    return pexpect.EOF


def test_ask_interrupted_returns_the_partial_answer(tiny_base, single_thread):
    """A KeyboardInterrupt while streaming stops generation at once and keeps what was said."""
    from lifealign_lite.chat import ChatSession
    from lifealign_lite.memory.bank import BankState

    tiny_base.model.generation_config.eos_token_id = None
    session = ChatSession(model=tiny_base.model, tokenizer=tiny_base.tokenizer, state=BankState(), domain="base",
                          threshold=0.2, embedder_factory=lambda: None)
    seen = []

    def on_token(piece):
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt

    started = time.monotonic()
    turn = session.ask("hello", on_token=on_token, max_new_tokens=100000)
    assert turn.interrupted and time.monotonic() - started < 60
    assert turn.text == "".join(seen).strip()
    assert session.history[-1]["content"] == turn.text


def test_every_engine_implements_the_engine_interface():
    """The torch and both llama.cpp sessions are engines (session.Engine) over one Session: ``ask`` is the Session's,
    ``generate`` and the adapter handling each engine's own; a session without an engine only routes."""
    from lifealign_lite.chat import ChatSession
    from lifealign_lite.llamacpp_py import LlamaSession
    from lifealign_lite.memory.bank import BankState
    from lifealign_lite.session import Engine, Session
    from lifealign_lite.xllama import XLlamaSession

    for cls in (ChatSession, XLlamaSession, LlamaSession):
        session = cls(model=None, tokenizer=None, state=BankState(), domain="auto", threshold=None, embedder_factory=lambda: None)
        assert isinstance(session, Engine), cls
        assert cls.ask is Session.ask and cls.route is Session.route, cls
        assert cls.generate is not Session.generate and cls.load_adapters is not Session.load_adapters, cls
    with pytest.raises(NotImplementedError):
        Session(model=None, tokenizer=None, state=BankState(), domain="auto", threshold=None, embedder_factory=lambda: None).generate("hi", "base", print)


# -- reading commands need an existing bank -------------------------------------------------------------------

@pytest.mark.parametrize("args", [["memory", "list"], ["memory", "versions"], ["memory", "show", "medical"], ["chat", "-p", "hi"],
                                  ["route", "hi"], ["memory", "export", "medical", "OUT"]])
def test_reading_commands_on_a_missing_bank_say_so(args, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = invoke([*args, "--bank", str(tmp_path / "bnak")], tmp_path / "home")
    assert result.exit_code == 2, result.stdout
    assert f"{tmp_path / 'bnak'}: no adapter bank there" in result.stderr
    assert not (tmp_path / "bnak").exists()


def test_lifealign_bank_setting_replaces_the_flag(tiny_bank, tmp_path):
    from typer.testing import CliRunner

    from lifealign_lite.cli.app import app

    result = CliRunner().invoke(app, ["memory", "list", "--json"], env={"LIFEALIGN_HOME": str(tmp_path / "home"), "LIFEALIGN_BANK": str(tiny_bank)})
    assert result.exit_code == 0, result.stderr
    assert [e["domain"] for e in json.loads(result.stdout)["entries"]] == ["medical", "core"]


def test_peft_export_loads_offline_with_auto_peft_model(tiny_bank, tiny_model_dir, tmp_path):
    """The export names the base model's folder and carries the tokenizer: AutoPeftModelForCausalLM loads it as it
    is, with the hub switched off, and its weight delta is the bank entry's."""
    out = tmp_path / "peft"
    result = invoke(["memory", "export", "medical", str(out), "--bank", str(tiny_bank)], tmp_path / "home")
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    module = "model.layers.0.self_attn.q_proj"
    script = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoTokenizer\n"
        "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "assert AutoTokenizer.from_pretrained(sys.argv[1]).chat_template\n"
        f"d = m.get_submodule('base_model.model.{module}').get_delta_weight('default')\n"
        "torch.save(d, sys.argv[2])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "delta.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    delta = torch.load(tmp_path / "delta.pt")
    torch.testing.assert_close(delta, read_adapter(Bank(tiny_bank).load().slot_dir("medical"))[0][module].dense(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("args", [["memory", "export", "medical", "USED", "--format", "merged"], ["chat", "--domain", "legal", "-p", "hi"]])
def test_errors_that_need_no_model_come_before_slow_imports(args, tiny_bank, tmp_path):
    """A used export folder or an unknown domain is reported without importing transformers or peft (seconds)."""
    used = tmp_path / "used"
    used.mkdir()
    (used / "file").write_text("x")
    args = [str(used) if a == "USED" else a for a in args] + ["--bank", str(tiny_bank)]
    script = ("import sys\nfrom typer.testing import CliRunner\nfrom lifealign_lite.cli.app import app\n"
              f"r = CliRunner().invoke(app, {args!r})\n"
              "assert r.exit_code == 2, r.output\nprint(r.output)\n"
              "assert 'peft' not in sys.modules and 'transformers' not in sys.modules, 'slow imports before the error'\n")
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, LIFEALIGN_HOME=str(tmp_path / "home")),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-1500:]
    assert "not empty" in proc.stdout or "unknown domain 'legal'" in proc.stdout


def test_memory_show_versions_json_and_core(tiny_bank, tmp_path):
    home = tmp_path / "home"
    shown = invoke(["memory", "show", "medical", "--json", "--bank", str(tiny_bank)], home)
    assert shown.exit_code == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["domain"] == "medical" and record["lineage"][0]["trained_pairs"] == 4 and record["lineage"][0]["pairs"] == 8
    table = invoke(["memory", "show", "medical", "--bank", str(tiny_bank)], home)
    assert "4 / 8" in table.stdout and not table.stdout.lstrip().startswith("{")
    core = json.loads(invoke(["memory", "show", "core", "--json", "--bank", str(tiny_bank)], home).stdout)
    assert core["tasks"] == ["medical"] and core["lineage"][0]["domain"] == "medical"
    versions = json.loads(invoke(["memory", "versions", "--json", "--bank", str(tiny_bank)], home).stdout)
    assert versions["current"] == 1 and [v["version"] for v in versions["versions"]] == [1]


def test_merged_export_prints_one_line_only(tiny_bank, tmp_path):
    """No third-party warnings or progress bars: the export's status line and its own line are all of stderr."""
    out = tmp_path / "merged"
    proc = subprocess.run([str(CLI), "memory", "export", "medical", str(out), "--format", "merged", "--bank", str(tiny_bank)],
                          env=dict(os.environ, LIFEALIGN_HOME=str(tmp_path / "home"), COLUMNS="300"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]  # the status line at the start, then the export's own line
    assert len(lines) == 2 and lines[0].startswith("export: medical as merged") and lines[1].startswith("exported medical as merged"), proc.stderr


def test_rollback_log_names_where_it_came_from_and_version_0_is_refused(tiny_bank, tmp_path):
    import shutil

    bank = tmp_path / "bank"
    shutil.copytree(tiny_bank, bank)
    home = tmp_path / "home"
    removed = invoke(["memory", "rm", "medical", "--bank", str(bank)], home)
    assert removed.exit_code == 0, removed.stderr
    assert "core keeps what every task taught it (medical)" in " ".join(removed.stderr.split())
    assert invoke(["memory", "rollback", "1", "--bank", str(bank)], home).exit_code == 0
    log = json.loads(invoke(["memory", "versions", "--json", "--bank", str(bank)], home).stdout)
    assert log["current"] == 1
    assert log["versions"][-1] == {**log["versions"][-1], "version": 1, "parent": 2, "event": "rollback from 2 to 1"}
    empty = invoke(["memory", "rollback", "0", "--bank", str(bank)], home)
    assert empty.exit_code == 2 and "empty bank" in empty.stderr
    assert json.loads(invoke(["memory", "versions", "--json", "--bank", str(bank)], home).stdout)["current"] == 1


# -- the direct fp32 merge (chat's default path) ---------------------------------------------------------------

def test_direct_merge_answers_as_peft_merge_and_switches_back_exactly(tiny_bank, tiny_model_dir, tmp_path, single_thread):
    """Chat adds each memory's B @ A into the fp32 weights itself (no PEFT): the weights and the greedy answer
    equal PEFT's merged model, and switching to base restores the base weights bit for bit."""
    from peft import PeftModel

    from lifealign_lite.chat import open_session
    from lifealign_lite.model import load_base
    from lifealign_lite.system import quiet

    recipe = load_recipe("edge-cpu", {"model": str(tiny_model_dir), "router": "base"})
    session = open_session(tiny_bank, tmp_path, recipe, domain="medical")
    assert not hasattr(session.model, "peft_config") and set(session.updates) == {"medical", "core"}
    turn = session.ask("hello there", max_new_tokens=TOKENS, keep_history=False)

    ref = load_base(str(tiny_model_dir), tmp_path, "none")
    with quiet():
        peft_model = PeftModel.from_pretrained(ref.model, str(session.state.slot_dir("medical"))).eval()
    merged = peft_model.merge_and_unload()
    ours = dict(session.model.named_parameters())
    changed = 0
    for name, param in merged.named_parameters():
        assert torch.equal(ours[name], param), name
        changed += int(name in {f"{m}.weight" for m in session.updates["medical"]})
    assert changed == len(session.updates["medical"]) > 0
    enc = ref.tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = merged.generate(**enc, max_new_tokens=TOKENS, do_sample=False, repetition_penalty=1.1, pad_token_id=ref.tokenizer.pad_token_id)
    assert turn.text == ref.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    base = load_base(str(tiny_model_dir), tmp_path, "none").model
    session.set_domain("base")
    session.ask("hello there", max_new_tokens=2, keep_history=False)
    assert session.active == "base"
    assert all(torch.equal(p, dict(base.named_parameters())[n]) for n, p in session.model.named_parameters())
