#!/usr/bin/env bash
# The GPU benchmark in one device call: install, check correctness, time, print a table last.
#
# The machine has no package registry, so everything comes as carried files (ignored paths):
#   .gpu/  from ../shared/gpu/pack-mlx-cuda.sh .gpu (MLX CUDA wheels in two xz parts, mlx-lm's wheel, unpack script)
#   .whl/  structlog's wheel (the only stratlm dependency the image lacks)
# The two parts together exceed one call's 64 MiB, so part .aa travels in a first call that
# copies it to /tmp (`cp .gpu/mlxcuda.part.aa /tmp/`), and this script runs in the next call,
# while the machine is still warm, carrying the rest. Results: $OUT/gpu_bench.log and *.json.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_site.sh
OUT=${OUT:-/tmp/gpu_bench_out}; export OUT; mkdir -p "$OUT"

part_aa=/tmp/mlxcuda.part.aa; [ -f .gpu/mlxcuda.part.aa ] && part_aa=.gpu/mlxcuda.part.aa
if [ ! -d /tmp/mlxsite/mlx ]; then
  bash .gpu/unpack-mlx-cuda.sh "$part_aa" .gpu/mlxcuda.part.ab || { echo "unpacking MLX CUDA failed"; exit 1; }
fi
site=/tmp/stratlm-site; mkdir -p "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
stratlm_site "$site" /tmp/mlxsite || exit 1
if [ -n "${GPU_SCRIPT:-}" ]; then  # another script in the same environment (e.g. scripts/gpu_profile.py)
  python3 $GPU_SCRIPT 2>&1 | tee "$OUT/$(basename "${GPU_SCRIPT%% *}" .py).log"; exit
fi
python3 scripts/gpu_bench.py 2>&1 | tee "$OUT/gpu_bench.log"
