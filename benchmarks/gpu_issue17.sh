#!/usr/bin/env bash
# Issue 17's GPU figures, on one NVIDIA GPU (H100/H200 class), from the repository root:
#
#   benchmarks/gpu_issue17.sh [OUT_DIR]        # about 6 minutes on one H200 (2026-12-04)
#   RAYTWIN_BENCH_GPU_CHUNK=524288 python -m benchmarks run sweep-gpu --repeat 2   # another chunk size
#
# Needs a CUDA jaxlib of the installed jax's version, e.g.
#   pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
# Steps, each failing loudly rather than timing something wrong:
#   1. JAX sees the GPU;
#   2. pre-flight: the fused Pallas kernel compiles with Triton and agrees with the XLA path on the
#      paper's Lorenz problem at N=8 (the --quick run checks it before timing anything);
#   3. the figures, one JSON record and Markdown table each (a failure in one does not lose the
#      others): lorenz-ensemble (2^3..2^23 trajectories; fused kernel, XLA path and diffrax measured,
#      the published DiffEqGPU/MPGOS/JAX times quoted), sweep-gpu (the thermal sweep in-process, fused
#      vs XLA, and through run_sweep on Ray GPU tasks) and fused-tuning (the fused kernel's launch
#      shape: scenarios and warps per program).
set -euo pipefail
out="${1:-runs/bench}"
mkdir -p "$out"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"

python -c 'import jax; g = jax.devices("gpu"); print("GPU:", g[0].device_kind, "jax", jax.__version__)'
python -m benchmarks run lorenz-ensemble --quick --repeat 1 --out "$out/gpu-preflight-$stamp.json"
failed=0
for name in lorenz-ensemble sweep-gpu fused-tuning; do
  python -m benchmarks run "$name" --repeat 3 --out "$out/gpu-$name-$stamp.json" || failed=1
  [ -f "$out/gpu-$name-$stamp.json" ] && python -m benchmarks report "$out/gpu-$name-$stamp.json" | tee "$out/gpu-$name-$stamp.md"
done
exit "$failed"
