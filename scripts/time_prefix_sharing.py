"""Interleaved per-batch timing of pair_logps forward + backward, prefix_sharing on vs off, on the default model
(hh-helpful, batch 2, max length 256, 1 thread). Usage: python scripts/time_prefix_sharing.py N_BATCHES (docs/PERFORMANCE.md)."""
import statistics, sys, time, torch, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
from lifealign_lite.recipe import load_recipe
from lifealign_lite.model import load_base, attach_adapters
from lifealign_lite.data import load_pairs
from lifealign_lite.train import tokenize_pairs, pair_logps
torch.set_num_threads(1)
recipe = load_recipe(None, {"quant": "none", "batch_size": 2, "max_length": 256, "lora_r": 8, "target_modules": ["q_proj", "v_proj"]})
base = load_base(recipe.model, Path.home() / ".lifealign-lite", recipe.quant, autocast_setting=recipe.autocast)
model = attach_adapters(base, recipe); model.train()
pairs = load_pairs(Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-helpful" / "train.jsonl", max_pairs=40, seed=0)
items, _ = tokenize_pairs(pairs, base.tokenizer, 256, 128)
pad = base.tokenizer.pad_token_id
nb = int(sys.argv[1])
ratios, tot = [], {"on": 0.0, "off": 0.0}
for k in range(nb):
    b = items[2 * k: 2 * k + 2]
    t = {}
    for mode in (("off", "on") if k % 2 else ("on", "off")):
        t0 = time.perf_counter()
        c, r, _, _ = pair_logps(model, b, pad, "cpu", prefix_sharing=mode)
        (c.sum() - r.sum()).backward(); model.zero_grad(set_to_none=True)
        t[mode] = time.perf_counter() - t0; tot[mode] += t[mode]
    ratios.append(t["off"] / t["on"])
    print(k, [len(x.prompt) for x in b], [len(x.chosen) for x in b], [len(x.rejected) for x in b], {m: round(v, 2) for m, v in t.items()}, round(ratios[-1], 2), flush=True)
print("median off/on", round(statistics.median(ratios), 3), "total off/on", round(tot["off"] / tot["on"], 3))
