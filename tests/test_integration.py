"""Integration: align the real default model (SmolLM2-135M-Instruct, converted from the embedded GGUF) for a few steps.

The converted model is cached in the ``lifealign_home`` fixture's folder (LIFEALIGN_TEST_HOME, else
~/.cache/lifealign-lite-test), so the one-time GGUF conversion (about 25 s) is paid once per machine.
The align run (8 steps of 2 pairs) plus the before/after scoring take about a minute on the 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lifealign_lite.align import align
from lifealign_lite.data import load_pairs, pairs_hash
from lifealign_lite.losses import fpo_loss
from lifealign_lite.model import DEFAULT_MODEL_NAME, default_model_dir, load_base
from lifealign_lite.recipe import load_recipe
from lifealign_lite.train import score_pairs, tokenize_pairs

from conftest import embedded_model_dir, require_path

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]  # one thread: see conftest

N_PAIRS = 16
SUMMARY_KEYS = {"data_hash", "pairs", "steps", "reward_acc_start", "reward_acc_end", "timings_s"}


@pytest.fixture(scope="module")
def model_dir(lifealign_home) -> Path:
    return embedded_model_dir(lifealign_home)


@pytest.fixture(scope="module")
def truthfulqa_16(tmp_path_factory) -> Path:
    src = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "truthfulqa" / "train.jsonl"
    require_path(src, "shared data file")
    lines = src.read_text(encoding="utf-8").splitlines()[:N_PAIRS]
    out = tmp_path_factory.mktemp("data") / "truthfulqa16.jsonl"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def recipe():
    # one epoch over the 16 pairs in 8 small steps: enough to move the loss, cheap enough for a 2-core CPU
    return load_recipe("edge-cpu", {"max_steps": 8, "batch_size": 2, "lr": 5e-4, "seed": 0})


@pytest.fixture(scope="module")
def aligned(model_dir, truthfulqa_16, recipe, lifealign_home, tmp_path_factory):
    bank = tmp_path_factory.mktemp("bank")
    return align(truthfulqa_16, recipe, lifealign_home, bank, domain="truthfulqa")


def test_converted_model_cache_holds_safetensors_only(model_dir, lifealign_home):
    assert model_dir == lifealign_home / "models" / DEFAULT_MODEL_NAME
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()
    pickled = [p.name for p in model_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert pickled == []
    # no half-written conversion left beside it
    assert not list(model_dir.parent.glob(".convert-*"))
    # a second call reuses the cache instead of converting again
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir(lifealign_home) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_run_folder_and_summary(aligned, truthfulqa_16, recipe):
    run = aligned.run_dir
    assert run.name.endswith("-truthfulqa")
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["data_hash"] == pairs_hash(load_pairs(truthfulqa_16))
    assert summary["pairs"] == N_PAIRS
    assert summary["steps"] == recipe.max_steps
    assert summary["trained_pairs"] == recipe.max_steps * recipe.batch_size
    for key in ("reward_acc_start", "reward_acc_end"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["timings_s"]["total"] > 0
    assert summary["model"]["name"] == DEFAULT_MODEL_NAME and summary["model"]["quant"] == "none"
    assert summary["recipe"]["lr"] == pytest.approx(5e-4)
    assert not (run / "checkpoint").exists()


def test_adapter_loads_in_peft_and_lowers_fpo_loss(aligned, truthfulqa_16, recipe, lifealign_home):
    from peft import PeftModel

    adapter = aligned.run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == recipe.lora_r and sorted(config["target_modules"]) == sorted(recipe.target_modules)

    base = load_base("default", lifealign_home, quant="none", device="cpu")
    pad = base.tokenizer.pad_token_id
    items, _ = tokenize_pairs(load_pairs(truthfulqa_16), base.tokenizer, recipe.max_length, recipe.max_prompt_length)
    ref = score_pairs(base.model, items, pad, "cpu")  # the reference: the base model as the task began
    trained = PeftModel.from_pretrained(base.model, str(adapter)).eval()
    now = score_pairs(trained, items, pad, "cpu")

    out = fpo_loss(now["chosen"], now["rejected"], ref["chosen"], ref["rejected"], beta=recipe.beta, gamma=recipe.focal_gamma)
    start = 0.25 * torch.log(torch.tensor(2.0)).item()  # h = 0 for every pair before training
    assert torch.isfinite(out.losses).all()
    assert out.losses.mean().item() < start - 1e-3, out.losses
    assert out.margins.mean().item() > 0
    # the adapter really changed the model
    assert (now["chosen"] - ref["chosen"]).abs().max().item() > 1e-2
