"""Export a bank entry: as a PEFT adapter folder, or merged into a full model folder transformers loads.

Merging happens in the base's full precision (never into 4-bit weights), and every merged export is checked
against the model it came from: both must give the same next-token logits on a probe prompt.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .memory.bank import Bank, BankError
from .memory.router import CORE
from .model import load_base

PROBE = [{"role": "user", "content": "In one sentence, what should I do if I feel unwell?"}]


def entry_dir(bank: Bank, name: str) -> Path:
    state = bank.load()
    if name == CORE:
        if not state.core_dir():
            raise BankError(f"{bank.root}: the bank has no core yet; align a domain first")
        return state.core_dir()
    return state.slot_dir(name)


def export_entry(bank_dir: Path, name: str, out: Path, fmt: str, home: Path, recipe) -> dict:
    """Write ``name`` (a domain or ``core``) to ``out`` as ``peft`` or ``merged``; returns what was checked."""
    from peft import PeftModel

    bank = Bank(bank_dir)
    src = entry_dir(bank, name)  # the version is verified when it is opened, so nothing damaged is copied
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BankError(f"{out}: exists and is not a folder; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise BankError(f"{out}: exists and is not empty; choose a new folder")
    if out.resolve().is_relative_to(bank.root.resolve()):
        raise BankError(f"{out}: inside the bank {bank.root}, whose files must not change; choose a folder outside it")
    if fmt == "peft":
        shutil.copytree(src, out, dirs_exist_ok=True)
        return {"format": "peft", "out": str(out)}
    if fmt != "merged":
        raise ValueError(f"unknown export format {fmt!r}; use peft or merged")
    base = load_base(recipe.model, home, "none", trust_remote_code=recipe.trust_remote_code)
    bank.check_base(base.info)
    peft_model = PeftModel.from_pretrained(base.model, str(src)).eval()
    probe = base.tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = peft_model(**probe).logits[0, -1]
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    base.tokenizer.save_pretrained(out)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    with torch.no_grad():
        got = reloaded(**probe).logits[0, -1]
    diff = float((got - expected).abs().max())
    if diff > 1e-3 or got.argmax() != expected.argmax():
        raise BankError(f"{out}: the merged export answers differently from the bank entry (max logit difference {diff:.2e})")
    return {"format": "merged", "out": str(out), "max_logit_diff": diff}
