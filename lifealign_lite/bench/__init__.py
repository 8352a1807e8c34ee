"""Benchmarks behind ``lifealign-lite bench``.

- :mod:`lifealign_lite.bench.speed`: training speed and memory against TRL's DPOTrainer (``bench speed``),
  CPU precision (``bench quant``) and chat latency (``bench chat``); every measured variant runs in its own
  subprocess (``python -m lifealign_lite.bench.speed _one VARIANT ...``) so peak resident memory is per variant.
- :mod:`lifealign_lite.bench.continual`: the continual-alignment protocol with baselines.

Importing this package is cheap (no torch, no transformers).
"""
