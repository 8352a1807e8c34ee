"""``bench serve``: the pure helpers, bad input, and a real run against a server of the tiny model and bank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifealign_lite.bench.serve import LEVEL_KEYS, TOP_KEYS, parse_clients, plan_requests, quantile, summarize
from lifealign_lite.errors import BenchError

REPO = Path(__file__).resolve().parents[1]


def test_parse_clients_keeps_the_order_and_refuses_bad_counts():
    assert parse_clients("1, 4,16") == [1, 4, 16] and parse_clients([2, 1]) == [2, 1]
    for bad in ("", "0,4", "1,x", "4,4", "-1"):
        with pytest.raises(BenchError, match="--clients"):
            parse_clients(bad)


def test_quantile_interpolates_between_order_statistics():
    xs = [10.0, 1.0, 3.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert quantile(xs, 0.5) == pytest.approx(5.5) and quantile(xs, 0.9) == pytest.approx(9.1)
    assert quantile([2.0], 0.9) == 2.0 and quantile([], 0.5) is None and quantile([1.0, 3.0], 1.0) == 3.0


def test_plan_cycles_models_over_the_prompts():
    plan = plan_requests([["p0"], ["p1"], ["p2"]], ["auto", "a", "b", "c"], 5)
    assert plan == [("auto", ["p0"]), ("a", ["p1"]), ("b", ["p2"]), ("c", ["p0"]), ("auto", ["p1"])]
    with pytest.raises(BenchError):
        plan_requests([], ["auto"], 2)


def test_summarize_counts_only_successful_requests_and_keeps_the_errors():
    ok = [{"ok": True, "ttft_s": t, "latency_s": 2 * t, "tokens": 4, "memory": m, "error": None} for t, m in ((0.1, "a"), (0.3, "b"), (0.2, "a"))]
    bad = {"ok": False, "ttft_s": None, "latency_s": None, "tokens": 0, "memory": None, "error": "HTTP 500: boom"}
    level = summarize(4, ok + [bad], wall_s=2.0)
    assert set(level) == LEVEL_KEYS
    assert (level["requests"], level["ok"], level["errors"], level["error_messages"]) == (4, 3, 1, ["HTTP 500: boom"])
    assert level["requests_per_s"] == 1.5 and level["tokens"] == 12 and level["tokens_per_s"] == 6.0
    assert level["ttft_median_s"] == 0.2 and level["ttft_p90_s"] == pytest.approx(0.28) and level["memories"] == {"a": 2, "b": 1}


def test_bench_help_lists_serve_and_its_options(tmp_path):
    from typer.testing import CliRunner

    from lifealign_lite.cli.app import app

    env = {"LIFEALIGN_HOME": str(tmp_path), "COLUMNS": "200"}
    assert "server throughput" in CliRunner().invoke(app, ["bench", "--help"], env=env).stdout
    result = CliRunner().invoke(app, ["bench", "serve", "-h"], env=env)
    assert result.exit_code == 0 and all(f in result.stdout for f in ("--clients", "--requests", "--max-tokens", "--data", "--json"))


def test_bad_input_is_a_one_line_error(tmp_path, tiny_bank):
    from typer.testing import CliRunner

    from lifealign_lite.cli.app import app

    env = {"LIFEALIGN_HOME": str(tmp_path)}
    cases = [
        (["--bank", str(tmp_path)], "no adapter bank there"),
        (["--bank", str(tiny_bank), "--clients", "1,0"], "--clients must be comma-separated positive integers"),
        (["--bank", str(tiny_bank), "--requests", "0"], "--requests must be >= 1"),
        (["--bank", str(tiny_bank), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: data file not found"),
    ]
    cases.append((["--bank", str(tiny_bank), "--model", str(tmp_path / "no-model"), "--data", str(REPO / "examples" / "medical.jsonl")],
                  "serve --bank"))  # the server itself refuses to start: its last line, on one line
    for args, words in cases:
        result = CliRunner().invoke(app, ["bench", "serve", *args], env=env)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and words in errors[0], result.stderr
        assert "Traceback" not in result.stderr


def test_bench_serve_runs_a_real_server_and_every_request_succeeds(tmp_path, tiny_bank, tiny_model_dir):
    from typer.testing import CliRunner

    from lifealign_lite.cli.app import app

    args = ["bench", "serve", "--bank", str(tiny_bank), "--model", str(tiny_model_dir), "--clients", "1,2", "--requests", "4",
            "--max-tokens", "2", "--threads", "1", "--data", str(REPO / "examples" / "medical.jsonl"), "--json"]
    result = CliRunner().invoke(app, args, env={"LIFEALIGN_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == TOP_KEYS and report["ok"] is True and report["server_start_s"] > 0
    assert report["settings"]["models"] == ["auto", "medical"] and report["settings"]["clients"] == [1, 2]
    assert list(report["clients"]) == ["1", "2"]
    for n, level in report["clients"].items():
        assert set(level) == LEVEL_KEYS and level["clients"] == int(n)
        assert (level["requests"], level["ok"], level["errors"]) == (4, 4, 0)
        assert level["tokens"] == 8  # the tiny model never ends early: 2 tokens per answer
        assert level["requests_per_s"] > 0 and 0 < level["ttft_median_s"] <= level["ttft_p90_s"] and level["ttft_median_s"] <= level["latency_median_s"]
        assert sum(level["memories"].values()) == 4 and "medical" in level["memories"]
    # on a pipe, progress is plain lines (one per finished request), not a bar that shows nothing until it ends
    assert ": 4/4 requests" in result.stderr and "\x1b[" not in result.stderr
