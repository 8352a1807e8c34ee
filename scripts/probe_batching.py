"""Probe for issue 15, point 2: does one left-padded batched ``generate`` serve same-memory requests faster than
one ``generate`` per request, and are its greedy answers the same?

Usage: LIFEALIGN_HOME=~/.lifealign-lite python scripts/probe_batching.py --tokens 24 --sizes 4,8 --threads 1

Prompts are the first hh-helpful dev prompts (seeded sample); decoding is the server's greedy decoding
(repetition penalty 1.1) on the default model in fp32. For each batch size and round, the requests run one at a
time and then as one batch, side by side in one process; one JSON line per (size, round) on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lifealign_lite.data import load_pairs
from lifealign_lite.model import load_base

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24, help="max_new_tokens of every answer")
    parser.add_argument("--sizes", default="4,8", help="batch sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hh-helpful" / "dev.jsonl"))
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    base = load_base("default", Path(os.environ.get("LIFEALIGN_HOME", Path.home() / ".lifealign-lite")), "none")
    model, tok = base.model.eval(), base.tokenizer
    prompts = [p.prompt for p in load_pairs(args.data, max_pairs=max(sizes), seed=0)]
    kw = dict(max_new_tokens=args.tokens, do_sample=False, repetition_penalty=1.1, pad_token_id=tok.pad_token_id, use_cache=True)

    def one(messages) -> list[int]:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return model.generate(**enc, **kw)[0, enc["input_ids"].shape[1]:].tolist()

    def batch(conversations) -> list[list[int]]:
        tok.padding_side = "left"  # new tokens then start at the same position in every row
        enc = tok.apply_chat_template(conversations, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True)
        rows = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:].tolist()
        # a row that ended early is padded after its end-of-sequence token: cut there, as a lone answer stops
        return [row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row for row in rows]

    with torch.no_grad():
        one(prompts[0])  # warm-up
        for size in sizes:
            for rnd in range(args.rounds):
                t0 = time.perf_counter()
                sequential = [one(p) for p in prompts[:size]]
                seq_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                batched = batch(prompts[:size])
                batch_s = time.perf_counter() - t0
                same = sum(a == b for a, b in zip(sequential, batched))
                print(json.dumps({"size": size, "round": rnd, "seq_s": round(seq_s, 2), "batch_s": round(batch_s, 2),
                                  "seq_req_per_s": round(size / seq_s, 3), "batch_req_per_s": round(size / batch_s, 3),
                                  "ratio_batch_vs_seq": round(seq_s / batch_s, 2), "identical": f"{same}/{size}",
                                  "tokens": sum(map(len, sequential)), "load_average": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
