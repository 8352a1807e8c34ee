"""The floor under the llama.cpp parity figures: the bare base model (no memory) in llama.cpp against transformers,
for the base GGUF as it is and re-written by the merged export with nothing merged in.

    python scripts/gguf_parity_floor.py PAIRS.jsonl [--n 50] [--outtype f16 q8_0] [--threads N] [--home ~/.lifealign-lite]

`memory export --format gguf-merged` writes every weight of the base GGUF again in --outtype (dequantized, plus the
memory's update where there is one): with an empty update (`write_merged_gguf({}, ...)`) the file holds only that
re-encoding, so its agreement with the transformers base is the best a merged file of that type can reach. Same
prompts and figures as `--check` (`export.parity_prompt_ids`, `export.compare_logprobs`); prints one JSON object.
--threads sets torch's and llama.cpp's threads (1 on a machine other jobs load: llama.cpp's threads wait for each
other at every step).
"""

from __future__ import annotations

import argparse
import os
import json
import tempfile
import time
from pathlib import Path

import torch

from lifealign_lite.export import compare_logprobs, llama_cpp, llama_logprobs, parity_prompt_ids, transformers_logprobs
from lifealign_lite.gguf_export import MERGED_TYPES, read_base, write_merged_gguf
from lifealign_lite.model import DEFAULT_MODEL, embedded_gguf_path, load_base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--outtype", nargs="+", default=list(MERGED_TYPES), choices=MERGED_TYPES)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--home", type=Path, default=Path.home() / ".lifealign-lite")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # llama_logprobs gives llama.cpp as many (lifealign_lite.llamacpp.threads)
    llama_cpp()
    model = load_base(DEFAULT_MODEL, args.home, "none")
    ids = parity_prompt_ids(model.tokenizer, args.pairs, args.n)
    want = transformers_logprobs(model.model.eval(), ids)
    base = read_base(embedded_gguf_path())
    report = {"prompts": len(ids), "base_gguf": str(base.path), "as_is": compare_logprobs(want, llama_logprobs(base.path, None, ids))}
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtype:
            out = Path(tmp) / f"bare-{outtype}.gguf"
            start = time.perf_counter()
            write_merged_gguf({}, base, out, outtype)
            report[f"merged_{outtype}"] = compare_logprobs(want, llama_logprobs(out, None, ids)) | {
                "file_mb": round(out.stat().st_size / 1e6, 1), "write_s": round(time.perf_counter() - start, 1)}
            out.unlink()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
