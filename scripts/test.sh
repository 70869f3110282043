#!/usr/bin/env bash
# The test command: install what is needed, lint, run the whole suite on 2 workers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
ruff check lora_jax tests examples benchmarks
# One BLAS/LAPACK thread per worker: two workers share two cores, and oversubscribed
# LAPACK calls (QR, eigh) inside jit were seen to stall for seconds.
export OMP_NUM_THREADS=1
# The tests' models are tiny: XLA's backend optimizations cost more compile time than they
# save (halves the contract suite's CPU time). Scripts that add flags append to these.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
python -m pytest -q -n 2 --durations=20 tests "$@"
