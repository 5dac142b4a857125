#!/usr/bin/env bash
# Prepared H200 check (≤ 10 minutes on one H200, install included): installs the CUDA build of JAX and
# this package, runs bench/h200.py, then the serving load test on the demo model (issue 17's c=16 vs
# c=1 throughput, at most 4 minutes; its table goes to OUT's folder as serve_demo.{json,txt}) and the
# engine with compacted vs full-width forwards (at most 2 minutes; engine_compact.txt: decides whether
# compact="auto" should turn compaction on for GPUs, serving/compact.py AUTO_COMPACT).
# Usage, from anywhere:  bash bench/h200.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/h200.json}"
python -m pip install --quiet -e ".[cuda]"
python -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', f'no GPU: {jax.devices()}'; print(d.device_kind)"
python bench/h200.py --out "$out"
timeout 120 python bench/engine.py --settings c4,f4 --reps 2 | tee "$(dirname "$out")/engine_compact.txt" \
  || echo "engine bench did not finish (status $?)"
timeout 240 python bench/serve.py --models demo --json "$(dirname "$out")/serve_demo.json" \
  | tee "$(dirname "$out")/serve_demo.txt" || echo "serve bench did not finish (status $?)"
