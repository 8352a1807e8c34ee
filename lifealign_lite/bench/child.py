"""The child process of every measured benchmark variant: ``python -m lifealign_lite.bench.child VARIANT --options JSON
--out FILE`` (started by :func:`lifealign_lite.bench.harness.run_child`).

It imports the benchmark module that owns the variant (a speed variant, ``quant-MODE`` or ``chat-MODE``), measures it
in this fresh process and writes one JSON object to ``--out``. It sits below the benchmarks, so the harness imports
no benchmark module and no benchmark imports another.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

from ..errors import BenchError
from ..system import peak_rss_mb
from . import chat, quant, speed
from .harness import child_setup, gpu_peak_mb, known_variant

MODES = {"quant": quant.one_mode, "chat": chat.one_mode}  # what the child runs for quant-MODE and chat-MODE


def run_one(variant: str, options: dict) -> dict:
    """Measure ``variant`` in this process with the function of the benchmark module that owns it."""
    if not known_variant(variant):
        raise BenchError(f"unknown variant {variant!r}")
    child_setup(options, variant)
    kind, _, mode = variant.partition("-")
    res = speed.one_variant(options, variant) if variant in speed.SPEED_VARIANTS else MODES[kind](options, mode)
    import torch

    res.update(peak_rss_mb=peak_rss_mb(), gpu_peak_mb=gpu_peak_mb(), torch_threads=torch.get_num_threads())
    return res


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lifealign_lite.bench.child", description="Run one benchmark variant (used by `lifealign-lite bench`).")
    parser.add_argument("variant")
    parser.add_argument("--options", required=True, help="JSON object of options")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    options = json.loads(args.options)
    t0 = time.perf_counter()
    try:
        result = run_one(args.variant, options)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which keeps going with the other variants
        result = {"ok": False, "variant": args.variant, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  "traceback": traceback.format_exc()[-4000:], "peak_rss_mb": peak_rss_mb()}
    result["child_s"] = round(time.perf_counter() - t0, 2)
    args.out.write_text(json.dumps(result))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
