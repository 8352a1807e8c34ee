"""Tests for ``lifealign-lite bench speed`` (and the helpers ``bench quant``/``bench chat`` share).

The pure helpers (token counting, pairs per step, ratios, FLOP estimate, result shape) run in milliseconds.
The subprocess protocol is checked with a variant that fails at once. One integration test runs the real
command on the real default model: 4 pairs, 2 steps, all three variants, each in its own process.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from lifealign_lite.bench import child, harness, speed
from lifealign_lite.bench.chat import bench_chat
from lifealign_lite.bench.harness import SPEED_VARIANTS, pair_tokens, pairs_in_steps, parse_variants, rate, ratio, total_tokens
from lifealign_lite.bench.speed import SPEED_TOP_KEYS, SPEED_VARIANT_KEYS, flops_per_token, share_of_peak, summarize_speed
from lifealign_lite.errors import BenchError

from conftest import embedded_model_dir, require_path


# -- token counting -------------------------------------------------------------------------------------

def test_pair_tokens_counts_the_prompt_in_both_sequences():
    assert pair_tokens(10, 3, 5) == (10 + 3) + (10 + 5)


def test_pair_tokens_truncates_each_sequence_to_max_length():
    # TRL keep_start: prompt+chosen = 130 -> 100, prompt+rejected = 95 stays
    assert pair_tokens(90, 40, 5, max_length=100) == 100 + 95
    assert pair_tokens(90, 40, 5, max_length=None) == 130 + 95


def test_pair_tokens_rejects_negative_lengths():
    with pytest.raises(ValueError):
        pair_tokens(-1, 2, 3)


def test_total_tokens_sums_pairs():
    assert total_tokens([(1, 2, 3), (4, 5, 6)]) == (3 + 4) + (9 + 10)
    assert total_tokens([(200, 100, 10)], max_length=256) == 256 + 210
    assert total_tokens([]) == 0


def test_pair_tokens_matches_lifealign_tokenized_count():
    from lifealign_lite.train import Tokenized

    t = Tokenized(prompt=[1] * 7, chosen=[2] * 3, rejected=[3] * 4)
    assert pair_tokens(7, 3, 4) == t.tokens


@pytest.mark.parametrize(
    "n, batch, steps, expected",
    [
        (40, 2, 0, 40),  # 0 = one epoch
        (40, 2, 20, 40),
        (4, 2, 2, 4),
        (3, 2, 2, 3),  # the last batch of the epoch is short
        (3, 2, 1, 2),
        (3, 2, 3, 5),  # second epoch begins
        (10, 4, 6, 20),
        (0, 2, 5, 0),
    ],
)
def test_pairs_in_steps(n, batch, steps, expected):
    assert pairs_in_steps(n, batch, steps) == expected


# -- ratios, rates, FLOPs -----------------------------------------------------------------------------------

def test_ratio_and_rate():
    assert ratio(0.3, 0.15) == 2.0
    assert ratio(1, 3) == 0.333
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None
    assert rate(40, 200) == 0.2
    assert rate(40, 0) is None
    assert rate(40, None) is None


def test_flops_per_token_is_eight_times_params():
    f = flops_per_token(134_515_008)
    assert f["total"] == 8 * 134_515_008
    assert f["policy_forward"] + f["backward"] + f["reference_forward"] == f["total"]
    # 6 * params (no reference pass) is the ~0.8 GFLOP/token of a 135M model; with the reference pass ~1.08
    assert math.isclose((f["policy_forward"] + f["backward"]) / 1e9, 0.807, abs_tol=0.01)
    assert math.isclose(f["total"] / 1e9, 1.076, abs_tol=0.01)


def test_share_of_peak():
    # 100 tokens/s at 1 GFLOP/token against a 200 GFLOP/s matmul = half of it
    assert share_of_peak(100.0, 1e9, 200.0) == 0.5
    assert share_of_peak(None, 1e9, 200.0) is None
    assert share_of_peak(100.0, 1e9, None) is None


def test_parse_variants():
    assert parse_variants(None, SPEED_VARIANTS) == list(SPEED_VARIANTS)
    assert parse_variants("", SPEED_VARIANTS) == list(SPEED_VARIANTS)
    assert parse_variants("lifealign, trl-tuned,lifealign", SPEED_VARIANTS) == ["lifealign", "trl-tuned"]
    with pytest.raises(BenchError, match="trl-fast"):
        parse_variants("trl-fast", SPEED_VARIANTS)


def test_known_variant():
    assert all(harness.known_variant(v) for v in ("lifealign", "trl-default", "quant-nf4", "chat-unmerged"))
    assert not any(harness.known_variant(v) for v in ("quant-fp8", "chat-", "nope"))


# -- result shape ---------------------------------------------------------------------------------------

def _variant(name: str, pairs_per_s: float, train_pairs_per_s: float, tokens_per_s: float = 50.0, ok: bool = True) -> dict:
    v = {k: None for k in SPEED_VARIANT_KEYS}
    v.update(ok=ok, variant=name, label=speed.SPEED_LABELS[name], pairs_per_s=pairs_per_s, train_pairs_per_s=train_pairs_per_s,
             tokens_per_s=tokens_per_s, params=134_515_008, peak_rss_mb=2000.0)
    return v


def test_summarize_speed_ratios_and_shape():
    variants = {
        "trl-default": _variant("trl-default", 0.10, 0.15),
        "trl-tuned": _variant("trl-tuned", 0.125, 0.2),
        "lifealign": _variant("lifealign", 0.25, 0.5, tokens_per_s=67.5),
    }
    matmul = {"n": 2048, "repeats": 5, "best_gflops": 135.0, "median_gflops": 130.0}
    res = summarize_speed(variants, matmul, {"pairs": 40}, {"cpu": "test"})
    assert SPEED_TOP_KEYS <= set(res)
    assert res["bench"] == "speed"
    assert res["ratio_vs_trl_default"] == 2.5
    assert res["ratio_vs_trl_tuned"] == 2.0
    assert res["train_ratio_vs_trl_default"] == round(0.5 / 0.15, 3)
    assert res["train_ratio_vs_trl_tuned"] == 2.5
    assert res["params"] == 134_515_008
    assert res["flops_per_token_estimate"] == 8 * 134_515_008
    assert res["share_of_matmul_peak"] == round(67.5 * 8 * 134_515_008 / 135e9, 4)
    assert res["ratio_shared_vs_unshared"] is None  # (d) not run
    json.loads(json.dumps(res))  # plain JSON all the way down


def test_summarize_speed_ratio_of_prefix_sharing():
    variants = {"lifealign": _variant("lifealign", 0.3, 0.5), "lifealign-unshared": _variant("lifealign-unshared", 0.2, 0.4)}
    res = summarize_speed(variants, None, {}, {})
    assert res["ratio_shared_vs_unshared"] == 1.5
    assert res["ratio_vs_trl_default"] is None  # (d) is no TRL anchor


def test_summarize_speed_with_a_failed_variant_leaves_its_ratio_empty():
    variants = {
        "trl-default": _variant("trl-default", 0.1, 0.15, ok=False),
        "trl-tuned": _variant("trl-tuned", 0.125, 0.2),
        "lifealign": _variant("lifealign", 0.25, 0.5),
    }
    res = summarize_speed(variants, None, {}, {})
    assert res["ratio_vs_trl_default"] is None and res["train_ratio_vs_trl_default"] is None
    assert res["ratio_vs_trl_tuned"] == 2.0
    assert res["share_of_matmul_peak"] is None  # no matmul measurement


def test_summarize_speed_without_lifealign():
    res = summarize_speed({"trl-tuned": _variant("trl-tuned", 0.1, 0.2)}, None, {}, {})
    assert res["ratio_vs_trl_tuned"] is None and res["ratio_vs_trl_default"] is None


# -- subprocess protocol and CLI errors (no model) --------------------------------------------------------

def test_child_failure_is_reported_not_raised():
    res = harness.run_child("no-such-variant", {"threads": 1}, timeout=120)
    assert res["ok"] is False
    assert "unknown variant" in res["error"]
    assert res["process_s"] > 0


def test_child_entry_point_writes_json(tmp_path):
    out = tmp_path / "r.json"
    assert child.main(["no-such-variant", "--options", "{}", "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert res["ok"] is False and "traceback" in res and res["peak_rss_mb"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pairs", "0"], "--pairs"),
        (["--variants", "trl-fast"], "trl-fast"),
        (["--max-length", "0"], "max_length"),
        (["--data", "/nonexistent/pairs.jsonl"], "not found"),
    ],
)
def test_bench_speed_bad_options_exit_2_before_any_work(env, args, message):
    from lifealign_lite.cli.app import app

    result = CliRunner().invoke(app, ["bench", "speed", *args], env=env)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_bench_help_lists_the_commands(env):
    from lifealign_lite.cli.app import app

    result = CliRunner().invoke(app, ["bench", "--help"], env=env)
    assert result.exit_code == 0
    for cmd in ("speed", "quant", "chat"):
        assert cmd in result.stdout


# -- integration: the real command on the real default model ----------------------------------------------

@pytest.mark.integration
def test_bench_speed_smoke_on_the_default_model(lifealign_home, shared_data):
    """All three variants, 4 pairs, 2 steps, each in its own process; one JSON object on stdout."""
    from lifealign_lite.cli.app import app
    data = require_path(shared_data / "hh-helpful" / "train.jsonl", "shared data file")
    embedded_model_dir(lifealign_home)  # the one-time GGUF conversion, outside the timed run
    args = ["bench", "speed", "--data", str(data), "--pairs", "4", "--steps", "2", "--max-length", "128",
            "--threads", "1", "--matmul-size", "512", "--matmul-repeats", "2", "--timeout", "300", "--json"]
    bank_existed = (lifealign_home / "bank").exists()
    result = CliRunner().invoke(app, args, env={"LIFEALIGN_HOME": str(lifealign_home)})
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert SPEED_TOP_KEYS <= set(res)
    assert set(res["variants"]) == set(SPEED_VARIANTS)
    for name, v in res["variants"].items():
        assert v["ok"], f"{name}: {v.get('error')}\n{v.get('traceback') or v.get('log_tail')}"
        assert SPEED_VARIANT_KEYS <= set(v), name
        assert v["steps"] == 2
        assert 1 <= v["pairs_trained"] <= 4
        assert v["tokens"] > 0 and v["tokens_per_s"] > 0 and v["pairs_per_s"] > 0
        assert v["peak_rss_mb"] >= v["rss_after_load_mb"] > 100
        assert v["wall_s"] > 0 and v["torch_threads"] == 1
    assert res["variants"]["trl-default"]["config"]["gradient_checkpointing"] is True
    assert res["variants"]["trl-default"]["config"]["precompute_ref_log_probs"] is False
    assert res["variants"]["trl-tuned"]["config"]["gradient_checkpointing"] is False
    assert res["variants"]["trl-tuned"]["config"]["precompute_ref_log_probs"] is True
    assert res["variants"]["lifealign"]["config"]["loss"] == "fpo"
    assert res["ratio_vs_trl_default"] > 0 and res["ratio_vs_trl_tuned"] > 0
    assert res["flops_per_token_estimate"] == 8 * res["params"]
    assert res["matmul"]["best_gflops"] > 0 and 0 < res["share_of_matmul_peak"]
    assert (lifealign_home / "bank").exists() == bank_existed  # the bench never writes a bank


@pytest.mark.integration
def test_bench_chat_reports_the_issue_keys_on_the_tiny_model(tiny_bank, tiny_model_dir, tmp_path):
    """One run of `bench chat` on the tiny bank: the top-level figures come from the merged mode's child (the slowest
    memory, the interleaved plain-transformers anchor), the CLI's cold start and `--help`."""
    result = bench_chat(tmp_path / "home", bank=tiny_bank, model=str(tiny_model_dir), new_tokens=4, repeats=1, cold_repeats=1,
                              modes="merged", threads=1)
    merged = result["modes"]["merged"]
    assert merged["ok"], merged.get("traceback")
    assert set(merged["memories"]) == {"medical", "core"} and merged["slowest_memory"] in merged["memories"]
    assert result["tokens_per_s"] == min(m["tokens_per_s"] for m in merged["memories"].values()) > 0
    assert result["transformers_tokens_per_s"] > 0 and result["switch_ms"] >= 0 and result["first_token_s"] > 0
    assert result["ratio_vs_transformers"] == ratio(result["tokens_per_s"], result["transformers_tokens_per_s"])
    assert result["cold_start"]["runs"][0]["ok"], result["cold_start"]["runs"][0].get("error")
    assert result["cold_start_first_token_s"] > 0 and result["help_s"] > 0


def test_a_long_child_says_it_is_still_running(monkeypatch):
    """While a variant's process runs, the parent logs `still running` every CHILD_HEARTBEAT_S (a piped log is never
    silent for a whole variant). The child here waits on its stdin, which the first heartbeat closes: no timing."""
    import subprocess
    import sys
    import time

    monkeypatch.setattr(harness, "CHILD_HEARTBEAT_S", 0.05)
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    lines = []

    def log(text):
        lines.append(text)
        proc.stdin.close()  # the child ends after the first heartbeat

    assert harness._wait_child(proc, "v", timeout=600, t0=time.perf_counter(), log=log) == 0
    assert lines and lines[0].startswith("v: still running (")
    stuck = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    assert harness._wait_child(stuck, "v", timeout=0.2, t0=time.perf_counter(), log=None) is None  # killed at its timeout
    assert stuck.returncode is not None


def test_bench_chat_merged_without_a_bank_merges_the_adapter_it_times(tiny_model_dir, tmp_path, single_thread):
    """Without --bank, merged mode times the random adapter merged in (it once timed the bare base: nothing merged)."""
    import torch

    from lifealign_lite.bench.chat import _torch_session, make_random_adapter

    home = tmp_path / "home"
    adapter = make_random_adapter(home, tmp_path / "adapter", str(tiny_model_dir), scale=0.5)
    session, memories = _torch_session({"model": str(tiny_model_dir), "adapter": str(adapter)}, "merged", home)
    assert memories == ["bench"]
    module = next(iter(session.updates["bench"]))
    before = session.model.get_submodule(module).weight.detach().clone()
    session.activate("bench")
    assert not torch.equal(session.model.get_submodule(module).weight, before)
    session.activate("base")
    assert torch.equal(session.model.get_submodule(module).weight, before)
