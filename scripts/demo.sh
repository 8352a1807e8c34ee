#!/usr/bin/env bash
# Set up, align the embedded default model on the sample medical data, then ask it one question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
lifealign-lite align examples/medical.jsonl --domain medical --max-steps 10
lifealign-lite align examples/support.jsonl --domain support --max-steps 10
lifealign-lite chat --domain medical --prompt "I have had a mild headache for two days. What should I do?"
