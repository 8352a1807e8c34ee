"""Benchmarks behind ``lifealign-lite bench``.

- :mod:`lifealign_lite.bench.harness`: runs every measured variant in its own subprocess
  (``python -m lifealign_lite.bench.child VARIANT ...``, :mod:`~.child`) so peak resident memory is per variant, and the
  helpers the benchmarks share.
- :mod:`lifealign_lite.bench.speed` (``bench speed``: training vs TRL's DPOTrainer), :mod:`~.quant` (``bench quant``:
  CPU precision), :mod:`~.chat` (``bench chat``: latency), :mod:`~.continual` (the continual-alignment protocol with
  baselines), :mod:`~.routing` (routing accuracy).

Importing this package is cheap (no torch, no transformers).
"""
