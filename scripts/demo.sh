#!/usr/bin/env bash
# The demo: install what is needed, then run the main example end to end on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
python examples/train_lora.py "$@"
