#!/usr/bin/env bash
# The demo: install what is needed, then train an AntiPaSTO steering adapter on the built-in
# tiny Qwen3, sweep alpha, print the metrics table and the plot path, save and restore.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
python examples/steer.py "$@"
