"""Export a bank entry: as a PEFT adapter folder, or merged into a full model folder transformers loads.

Merging happens in the base's full precision (never into 4-bit weights), and every merged export is checked
against the model it came from: both must give the same next-token logits on a probe prompt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import InputError
from .memory.bank import Bank, BankError
from .memory.router import CORE
from .system import quiet
from .model import load_base, resolve_model_path

PROBE = [{"role": "user", "content": "In one sentence, what should I do if I feel unwell?"}]


def entry_dir(bank: Bank, name: str) -> Path:
    state = bank.load()
    if name == CORE:
        if not state.core_dir():
            raise BankError(f"{bank.root}: the bank has no core yet; align a domain first")
        return state.core_dir()
    return state.slot_dir(name)


def export_entry(bank_dir: Path, name: str, out: Path, fmt: str, home: Path, recipe) -> dict:
    """Write ``name`` (a domain or ``core``) to ``out`` as ``peft`` or ``merged``; returns what was checked.

    A PEFT export names the base model's folder (the converted embedded model in the model cache, a local folder)
    or hub id as ``base_model_name_or_path`` and carries the tokenizer, so ``AutoPeftModelForCausalLM`` loads it
    offline as it is.
    """
    out = Path(out)
    if fmt not in ("peft", "merged"):
        raise InputError(f"unknown export format {fmt!r}; use peft or merged")
    if out.exists() and not out.is_dir():
        raise BankError(f"{out}: exists and is not a folder; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise BankError(f"{out}: exists and is not empty; choose a new folder")
    bank = Bank(bank_dir)
    if out.resolve().is_relative_to(bank.root.resolve()):
        raise BankError(f"{out}: inside the bank {bank.root}, whose files must not change; choose a folder outside it")
    src = entry_dir(bank, name)  # the version is verified when it is opened, so nothing damaged is copied
    base_spec = bank.manifest()["base"]["name"]  # the model the bank was built on
    if fmt == "peft":
        return export_peft(src, out, resolve_model_path(base_spec, home))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_base(base_spec, home, "none", trust_remote_code=recipe.trust_remote_code)
    bank.check_base(base.info)
    probe = base.tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with quiet(), torch.no_grad():  # no third-party warnings or progress bars around our one line
        peft_model = PeftModel.from_pretrained(base.model, str(src)).eval()
        expected = peft_model(**probe).logits[0, -1]
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
        base.tokenizer.save_pretrained(out)
        reloaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
        got = reloaded(**probe).logits[0, -1]
    diff = float((got - expected).abs().max())
    if diff > 1e-3 or got.argmax() != expected.argmax():
        raise BankError(f"{out}: the merged export answers differently from the bank entry (max logit difference {diff:.2e})")
    return {"format": "merged", "out": str(out), "max_logit_diff": diff}


def export_peft(src: Path, out: Path, base_path: str) -> dict:
    """Copy the adapter folder, point its config at ``base_path`` and add the base's tokenizer."""
    from transformers import AutoTokenizer

    shutil.copytree(src, out, dirs_exist_ok=True)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_path
    config_path.write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    return {"format": "peft", "out": str(out), "base": base_path}


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def export_all(bank_dir: Path, out: Path, home: Path, recipe) -> dict:
    """Every domain and the core as PEFT folders named after them in ``out``, and the vLLM command that serves them."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BankError(f"{out}: exists and is not an empty folder; choose a new folder")
    state = Bank(bank_dir).load()
    names = sorted(state.domains) + ([CORE] if state.core_dir() else [])
    if not names:
        raise BankError(f"{bank_dir}: no domains aligned yet; nothing to export")
    results = [export_entry(bank_dir, name, out / name, "peft", home, recipe) for name in names]
    rank = next((r for r in VLLM_LORA_RANKS if r >= state.meta.get("bank_rank", 8)), VLLM_LORA_RANKS[-1])
    modules = " ".join(f"{name}={out / name}" for name in names)
    command = f"vllm serve {results[0]['base']} --enable-lora --lora-modules {modules} --max-lora-rank {rank}"
    return {"format": "peft", "out": str(out), "names": names, "vllm": command}
