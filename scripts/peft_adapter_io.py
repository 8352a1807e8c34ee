"""Hand-written adapter I/O (memory/adapter.py) vs PEFT's LoraConfig / load_peft_weights / get_pattern_key, on a
slot shaped like SmolLM2-135M's (30 layers, q_proj 576x576 and v_proj 192x576, mixed ranks <= 16 via rank_pattern).
Run: python scripts/peft_adapter_io.py (docs/ARCHITECTURE.md, hand-written on purpose)"""
import json, re, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import torch

from lifealign_lite.memory.adapter import _LORA_A, _LORA_B, read_adapter, write_adapter
from lifealign_lite.memory.consolidate import LowRank
from lifealign_lite.model import PEFT_PREFIX

torch.manual_seed(0)
update = {}
for layer in range(30):
    for proj, out in (("q_proj", 576), ("v_proj", 192)):
        r = 4 + (layer * 7 + len(proj)) % 13  # ranks 4..16, mixed
        update[f"model.layers.{layer}.self_attn.{proj}"] = LowRank(torch.randn(out, r), torch.randn(r, 576))


def best(fn, n=30):
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times) * 1000, statistics.median(times) * 1000


def peft_write(folder: Path):
    from peft import LoraConfig
    from safetensors.torch import save_file
    from lifealign_lite.memory.adapter import STORAGE_DTYPE
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {n: max(u.rank, 1) for n, u in update.items()}
    r = max(ranks.values())
    tensors = {}
    for name, u in update.items():
        tensors[f"{PEFT_PREFIX}{name}{_LORA_B}"] = u.B.to(STORAGE_DTYPE).contiguous()
        tensors[f"{PEFT_PREFIX}{name}{_LORA_A}"] = u.A.to(STORAGE_DTYPE).contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    pattern = {re.escape(n): k for n, k in sorted(ranks.items()) if k != r}
    LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=pattern, target_modules=["q_proj", "v_proj"], bias="none",
               task_type="CAUSAL_LM", base_model_name_or_path="SmolLM2-135M-Instruct", inference_mode=True).save_pretrained(str(folder))


def peft_read(folder: Path):
    from peft import LoraConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key
    config = LoraConfig.from_pretrained(str(folder))
    tensors = load_peft_weights(str(folder), device="cpu")
    out = {}
    for key, a in tensors.items():
        if key.endswith(_LORA_A):
            name = key[len(PEFT_PREFIX):-len(_LORA_A)]
            b = tensors[key[: -len(_LORA_A)] + _LORA_B]
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
            out[name] = LowRank(b.float() * (alpha / a.shape[0]), a.float())
    return out, config


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    t = time.perf_counter(); import peft  # noqa: F401
    peft_import_ms = (time.perf_counter() - t) * 1000
    ours, theirs = tmp / "ours", tmp / "peft"
    write_adapter(ours, update, 16, ["q_proj", "v_proj"], "SmolLM2-135M-Instruct")
    peft_write(theirs)
    a, _ = read_adapter(ours)
    b, _ = peft_read(ours)
    c, _ = read_adapter(theirs)  # a PEFT-written folder reads with ours too
    same = all(torch.equal(a[k].B, b[k].B) and torch.equal(a[k].A, b[k].A) and torch.equal(a[k].B, c[k].B) for k in a)
    print(json.dumps({
        "same_updates": same,
        "write_ms_ours": best(lambda: write_adapter(tmp / "w1", update, 16, ["q_proj", "v_proj"], "x")),
        "write_ms_peft": best(lambda: peft_write(tmp / "w2")),
        "read_ms_ours": best(lambda: read_adapter(ours)),
        "read_ms_peft": best(lambda: peft_read(ours)),
        "config_keys_ours": len(json.loads((ours / "adapter_config.json").read_text())),
        "config_keys_peft": len(json.loads((theirs / "adapter_config.json").read_text())),
        "config_bytes": [(ours / "adapter_config.json").stat().st_size, (theirs / "adapter_config.json").stat().st_size],
        "peft_import_ms_in_this_process_after_bank": round(peft_import_ms),
    }, indent=1))
