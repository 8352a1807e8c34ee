"""Data-parallel align with real processes: `align --num-processes 2` (gloo on this CPU) against one process,
a process killed mid-training, the refusals, and the GPU configs (loaded by accelerate; FSDP's units chosen on a
tiny model). Everything runs on the conftest's tiny Llama saved as a model folder; no GPU is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lifealign_lite.align import align
from lifealign_lite.cli.app import app
from lifealign_lite.memory.bank import Bank
from lifealign_lite.recipe import load_recipe

from conftest import require_path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CLI = Path(sys.executable).parent / "lifealign-lite"
# 11 pairs in batches of 5 with 2 batches per step, 2 epochs: 3 steps over 6 batches, two of them a single pair
# (the second process then has no pair and scores one with weight 0), gradient accumulation across batches
SETTINGS = {"max_pairs": 11, "batch_size": 5, "grad_accum": 2, "epochs": 2, "lr": 2e-3, "seed": 3, "router": "base",
            "max_length": 64, "max_prompt_length": 32, "autocast": "none", "lora_dropout": 0.0}


def cli_args(model: Path, bank: Path, domain: str, settings: dict) -> list[str]:
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    return [str(EXAMPLES / f"{domain}.jsonl"), "--domain", domain, "--bank", str(bank), "--model", str(model), *sets]


def run_cli(args: list[str], home: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, LIFEALIGN_HOME=str(home), COLUMNS="200")
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run([str(CLI), *args], env=env, capture_output=True, text=True, timeout=timeout)


def digests(root: Path) -> dict[str, str]:
    """Every file of the bank but its run folders and the lock (what a version, the manifest and the log hold)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock" and p.relative_to(root).parts[0] != "runs"}


def log_lines(run: Path) -> list[dict]:
    path = run / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@pytest.fixture(autouse=True)
def needs_cli():
    require_path(CLI, "the lifealign-lite console script")


def test_two_processes_train_what_one_process_trains(tiny_model_dir, home, tmp_path, single_thread):
    one_bank, two_bank = tmp_path / "one", tmp_path / "two"
    recipe = load_recipe(None, {**SETTINGS, "model": str(tiny_model_dir)})
    one = align(EXAMPLES / "medical.jsonl", recipe, home, one_bank, domain="medical")
    two = run_cli(["align", *cli_args(tiny_model_dir, two_bank, "medical", SETTINGS), "--num-processes", "2", "--json"], home)
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads(two.stdout)  # one summary: only the main process prints
    assert summary["processes"] == 2 and summary["steps"] == one.summary["steps"] == 3
    assert summary["trained_pairs"] == one.summary["trained_pairs"] == 22

    # the bank: one new version, written once (one entry in the version log, one run folder, nothing left over)
    manifest = Bank(two_bank).manifest()
    assert manifest["current"] == 1 and [v["version"] for v in manifest["versions"]] == [1]
    assert len(list((two_bank / "runs").iterdir())) == 1 and not list((two_bank / "versions").glob(".tmp-*"))
    Bank(two_bank).load()  # verifies every checksum

    # per step: the same pairs, loss and gradient norm (the reduced gradient is the one-process batch mean: a
    # gradient summed instead of averaged, or a half-batch lost, changes the norm by a factor ~2 or ~1.4)
    run_two = Path(summary["run_dir"])
    log1, log2 = log_lines(one.run_dir), log_lines(run_two)
    assert [r["pairs"] for r in log2] == [r["pairs"] for r in log1] and sum(r["pairs"] for r in log1) == 22
    for a, b in zip(log1, log2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)

    # the adapters agree to float rounding. Each process pads its own half-batch and the gradient is summed in
    # another order, so fp32 results differ in their last bits (~1e-7 relative); three Adam steps carry that
    # forward (2e-6 measured). 1e-4 of the learned update leaves room for that and fails for any real change:
    # weights loaded in bf16 by one process gave 0.1, and another seed gives about 1 (checked below).
    w1 = load_file(str(one.run_dir / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(run_two / "adapter" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys() and w1
    b_keys = [k for k in w1 if "lora_B" in k]  # B starts at zero: it is all learned update
    diff = max(float((w2[k] - w1[k]).norm() / w1[k].norm()) for k in b_keys)
    assert diff < 1e-4, f"relative difference of the learned LoRA B matrices: {diff:.2e}"
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-3, atol=1e-5), k
    other = align(EXAMPLES / "medical.jsonl", load_recipe(None, {**SETTINGS, "seed": 4, "model": str(tiny_model_dir)}), home,
                  tmp_path / "other", domain="medical")
    w3 = load_file(str(other.run_dir / "adapter" / "adapter_model.safetensors"))
    assert min(float((w3[k] - w1[k]).norm() / w1[k].norm()) for k in b_keys) > 0.1
    print(f"distributed: 2 vs 1 process, largest relative difference of the LoRA B matrices {diff:.2e}")


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker process with this RANK among the launcher's children."""
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "lifealign_lite.cli.app" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def test_killing_one_process_leaves_the_bank_and_resume_finishes(tiny_model_dir, home, tmp_path, single_thread):
    bank = tmp_path / "bank"
    settings = {**SETTINGS, "max_pairs": 16, "batch_size": 2, "grad_accum": 1, "epochs": 0, "max_steps": 60, "checkpoint_every": 1}
    recipe = load_recipe(None, {**settings, "model": str(tiny_model_dir), "max_steps": 1})
    align(EXAMPLES / "support.jsonl", recipe, home, bank, domain="support")  # version 1
    before = digests(bank)

    env = dict(os.environ, LIFEALIGN_HOME=str(home), COLUMNS="200")
    log = tmp_path / "align.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(CLI), "align", *cli_args(tiny_model_dir, bank, "medical", settings), "--num-processes", "2"],
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not any(len(log_lines(run)) >= 3 for run in (bank / "runs").glob("*-medical")):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.05)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None, "no process with RANK=1 under the launcher"
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode in (2, 130), text[-3000:]
    assert "Traceback" not in text and "FutureWarning" not in text, text[-3000:]
    # the main process says it stopped and saved a checkpoint; the launcher names the process that was killed
    assert "interrupted: another process of the run stopped" in text or "process 1 of 2 was killed by SIGKILL" in text, text[-3000:]

    # the bank is unchanged (no new version, nothing half-written) and its lock is free
    assert digests(bank) == before
    assert not list((bank / "versions").glob(".tmp-*"))
    with Bank(bank).lock(wait_s=0):
        pass
    (run,) = (bank / "runs").glob("*-medical")
    stopped_at = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert 3 <= stopped_at < 60 and not (run / "summary.json").exists()

    # --resume in one process continues from the checkpoint and commits the version
    result = align(EXAMPLES / "medical.jsonl", load_recipe(None, {**settings, "model": str(tiny_model_dir)}), home, bank,
                   domain="medical", resume=True)
    assert result.run_dir == run and result.summary["steps"] == 60 and result.bank_version == 2
    assert [r["step"] for r in log_lines(run)] == list(range(1, 61))
    assert Bank(bank).load().version == 2 and [v["version"] for v in Bank(bank).manifest()["versions"]] == [1, 2]


def test_bad_data_with_num_processes_is_one_line(tmp_path, tiny_model_dir, home):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "a"}\n')
    result = run_cli(["align", str(data), "--bank", str(tmp_path / "bank"), "--model", str(tiny_model_dir), "--num-processes", "2"], home)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "bad.jsonl:1" in result.stderr
    assert not (tmp_path / "bank").exists()


@pytest.mark.parametrize("args", [["eval", "DATA", "--bank", "BANK"], ["bench", "continual", "a=DATA:DATA", "--out", "OUT"]])
def test_eval_and_bench_continual_refuse_a_launcher(args, tmp_path):
    data = EXAMPLES / "medical.jsonl"
    args = [str(data) if a == "DATA" else a.replace("DATA", str(data)) for a in args]
    args = [str(tmp_path / a.lower()) if a in ("BANK", "OUT") else a for a in args]
    result = CliRunner().invoke(app, args, env={"WORLD_SIZE": "2", "RANK": "0", "COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    assert "runs in one process" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    quiet = CliRunner().invoke(app, args, env={"WORLD_SIZE": "2", "RANK": "1", "COLUMNS": "250"})
    assert quiet.exit_code == 2 and quiet.stderr == ""  # the other processes stop silently


def test_relaunch_args_give_the_command_back(tmp_path):
    import click

    from lifealign_lite.cli.common import relaunch_args

    seen = {}
    command = click.Command(
        "align", callback=lambda **kw: seen.setdefault("args", relaunch_args(click.get_current_context(), drop={"num_processes"})),
        params=[click.Argument(["data"]), click.Option(["--domain", "-d"]), click.Option(["--set", "sets"], multiple=True),
                click.Option(["--resume"], is_flag=True), click.Option(["--json", "as_json"], is_flag=True),
                click.Option(["--num-processes"], type=int, default=1), click.Option(["--lr"], type=float)])
    group = click.Group("lifealign-lite", commands={"align": command})
    group.main(["align", "d.jsonl", "-d", "x", "--set", "a=1", "--set", "b=2", "--resume", "--num-processes", "2", "--lr", "0.001"], standalone_mode=False)
    assert seen["args"] == ["align", "d.jsonl", "--domain", "x", "--set", "a=1", "--set", "b=2", "--resume", "--lr", "0.001"]


def test_accelerate_configs_load_and_fsdp_qlora_stores_4bit_in_the_compute_dtype(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(REPO / "recipes" / "accelerate" / "ddp.yaml"))
    assert str(ddp.distributed_type).endswith("MULTI_GPU") and ddp.num_processes == 2 and not ddp.use_cpu
    fsdp = load_config_from_file(str(REPO / "recipes" / "accelerate" / "fsdp-qlora.yaml"))
    assert str(fsdp.distributed_type).endswith("FSDP")
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is True and fsdp.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"

    from lifealign_lite.model import quantization_config

    plain = quantization_config("nf4", "cuda")
    assert plain.bnb_4bit_quant_storage == torch.uint8  # one GPU: bitsandbytes' default packing
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for an FSDP config
    sharded = quantization_config("nf4", "cuda:1")
    assert sharded.bnb_4bit_quant_storage == sharded.bnb_4bit_compute_dtype == torch.bfloat16


def test_fsdp_units_are_the_decoder_layers_and_the_lora_matrices(tiny_base):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lifealign_lite.distributed import fsdp_wrap_policy
    from lifealign_lite.model import attach_adapters

    model = attach_adapters(tiny_base, load_recipe(None, {"lora_r": 4}))
    policy = fsdp_wrap_policy(model)
    units = {name for name, module in model.named_modules() if name and policy(module=module, recurse=False, nonwrapped_numel=0)}
    layers = {name for name, module in model.named_modules() if isinstance(module, LlamaDecoderLayer)}
    lora = {name for name, module in model.named_modules() if name.endswith((".lora_A.short", ".lora_B.short"))}
    assert len(layers) == 2 and len(lora) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    assert units == layers | lora
    assert not any("embed_tokens" in u or "lm_head" in u or "base_layer" in u for u in units)
