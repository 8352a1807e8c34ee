"""What continuous batching can give on this machine at most (issue 24): llama.cpp's server of the xllamacpp wheel,
in this process and without HTTP, the default model's GGUF with no adapter, ``B`` identical greedy completions of
``--tokens`` tokens started at once on ``--parallel`` slots, for each ``B`` of ``--batches``. Prints the total
tokens/s (prompt included, as a client sees it) and each sequence's own decode speed from llama.cpp's ``timings``.

    python scripts/llama_batch_ceiling.py --threads 2 --batches 1,4,16

Where ``B`` sequences together decode no faster in total than one (decoding is compute-bound, as on a 2-core CPU
with a 135M model), no server can make 16 clients get 3x the tokens/s of one: the figure to hold a server to is
its ratio to this ceiling at the same concurrency.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time

from llama_decode_settings import PROMPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,4,16", help="concurrent completions, comma-separated")
    parser.add_argument("--parallel", type=int, default=16, help="server slots (at least the largest batch)")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    import xllamacpp as xlc

    from lifealign_lite.export import embedded_gguf_path

    p = xlc.CommonParams()
    p.model.path = str(embedded_gguf_path())
    p.n_parallel, p.n_ctx = args.parallel, args.parallel * 512
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = args.threads
    p.cache_ram_mib, p.verbosity, p.use_jinja = 0, -1, True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        p.hostnames, p.port = ["127.0.0.1"], s.getsockname()[1]
    server = xlc.Server(p)
    body = {"prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0.0, "top_k": 0, "min_p": 0.0, "ignore_eos": True, "cache_prompt": False}
    server.handle_completions(dict(body, max_tokens=4))  # warm-up
    for batch in (int(b) for b in args.batches.split(",")):
        timings = []
        workers = [threading.Thread(target=lambda: timings.append(server.handle_completions(body)["timings"])) for _ in range(batch)]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t
        print(f"threads {args.threads}  batch {batch}: {batch * args.tokens / wall:.1f} tokens/s in total, each sequence decoding at "
              f"{statistics.median(x['predicted_per_second'] for x in timings):.1f} (median), {wall:.2f} s, load average {os.getloadavg()[0]:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
