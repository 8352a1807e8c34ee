"""Decode speed of the xllamacpp wheel's llama.cpp server under several settings, side by side (issue 24).

Each setting runs in a process of its own (libgomp reads ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` once, at load),
settings interleaved over rounds so they share the machine's load; each run times ``--n`` plain greedy completions
of ``--tokens`` tokens of the default model's GGUF (no adapter, no penalty unless asked, the end token ignored) and
reports llama.cpp's own decode speed (``timings.predicted_per_second``) and prompt time (``prompt_ms``). Prints each run, then the median per
setting and its ratio to the first. Compare ratios only: absolute speeds follow the machine's load.

    python scripts/llama_decode_settings.py --rounds 3 \\
        '{"threads": 1}' '{"threads": 2}' '{"threads": 2, "env": {"OMP_WAIT_POLICY": "passive"}}'

A setting: ``threads`` (decode, and batch unless ``batch_threads``), ``fa`` (a ``llama_flash_attn_type`` member name), ``n_ctx`` (0: the
model's own), ``kv`` (a ``ggml_type`` member name for the KV cache), ``penalty`` and ``last_n`` (repetition
penalty over the last ``last_n`` tokens), ``env`` (variables of that run's process).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"  # chat's: 41 tokens
          "<|im_start|>user\nWhat is a good way to learn a new language?<|im_end|>\n<|im_start|>assistant\n")


def one_run(setting: dict, n: int, tokens: int) -> dict:
    import xllamacpp as xlc

    from lifealign_lite.export import embedded_gguf_path

    p = xlc.CommonParams()
    p.model.path = str(embedded_gguf_path())
    p.n_ctx = setting.get("n_ctx", 0)
    p.cpuparams.n_threads = setting.get("threads", 1)
    p.cpuparams_batch.n_threads = setting.get("batch_threads", p.cpuparams.n_threads)
    if "fa" in setting:
        p.flash_attn_type = getattr(xlc.llama_flash_attn_type, setting["fa"])
    if "kv" in setting:
        p.cache_type_k = p.cache_type_v = getattr(xlc.ggml_type, setting["kv"])
    p.cache_ram_mib, p.verbosity, p.use_jinja = 0, -1, True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        p.hostnames, p.port = ["127.0.0.1"], s.getsockname()[1]
    t = time.perf_counter()
    server = xlc.Server(p)
    start_s = time.perf_counter() - t
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0, "top_k": 0, "min_p": 0.0, "ignore_eos": True, "cache_prompt": False,
            "repeat_penalty": setting.get("penalty", 1.0), "repeat_last_n": setting.get("last_n", 64)}
    server.handle_completions(dict(body, max_tokens=4))  # warm-up
    timings = [server.handle_completions(body)["timings"] for _ in range(n)]
    speeds = [t["predicted_per_second"] for t in timings]
    return {"decode_tokens_per_s": round(statistics.median(speeds), 2), "runs": [round(x, 2) for x in speeds], "start_s": round(start_s, 2),
            "prompt_ms": round(statistics.median(t["prompt_ms"] for t in timings), 1), "prompt_tokens": timings[0]["prompt_n"],
            "load_average": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("settings", nargs="*", help="JSON objects, the first the reference")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=3, help="timed completions per run")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run; a run past it counts as failed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(json.loads(args.child), args.n, args.tokens)))
        return
    settings = [json.loads(s) for s in args.settings]
    results: list[list[dict]] = [[] for _ in settings]
    for r in range(args.rounds):
        for i in [(j + r) % len(settings) for j in range(len(settings))]:  # a different one first in each round
            setting = dict(settings[i])
            env = dict(os.environ, **setting.pop("env", {}))
            cmd = [sys.executable, __file__, "--n", str(args.n), "--tokens", str(args.tokens), "--child", json.dumps(setting)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                res = json.loads(out.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                res = {"failed": f"over {args.timeout:.0f} s"}
            except (IndexError, json.JSONDecodeError):
                res = {"failed": out.stderr[-300:]}
            results[i].append(res)
            print(r, json.dumps(settings[i]), json.dumps(res), flush=True)
    ok = [[x["decode_tokens_per_s"] for x in runs if "failed" not in x] for runs in results]
    ref = statistics.median(ok[0]) if ok[0] else None
    for setting, speeds, runs in zip(settings, ok, results):
        med = statistics.median(speeds) if speeds else None
        rat = round(med / ref, 2) if med and ref else None
        prompt = [x["prompt_ms"] for x in runs if "failed" not in x]
        print(f"{json.dumps(setting)}: median {med} tokens/s, ratio {rat}, prompt {statistics.median(prompt) if prompt else None} ms, "
              f"{len(runs) - len(speeds)} of {len(runs)} runs failed")


if __name__ == "__main__":
    main()
