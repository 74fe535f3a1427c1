#!/usr/bin/env bash
# `stratlm serve` against `mlx_lm.server` on the GPU machine, in one device call after a first
# that brings half of MLX's CUDA wheel. The machine has no package registry, so everything comes
# as carried files (ignored paths) in one folder, $FILES (default runs/serve-gpu):
#   cudawhl.part.aa, .ab   mlx-cuda-13's wheel split in two (`split -b 58M`): part .aa travels in a
#                          first call that copies it to /tmp, this script runs in the next
#   mlx-*.whl, mlx_lm-*.whl
#   serve/                 the model's shape (config json) and a real tokenizer (SmolLM2's)
#   whl/                   the server's and stratlm's wheels the image lacks (fastapi, uvicorn, ...)
# Arguments go to scripts/load_bench.py. Results: $OUT/load_bench.log and $OUT/load_bench.json.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_site.sh
OUT=${OUT:-/tmp/serve_bench_out}; export OUT; mkdir -p "$OUT"
F=${FILES:-runs/serve-gpu}

site=/tmp/serve-site
if [ ! -f "$site/mlx/core.cpython-312-x86_64-linux-gnu.so" ] && [ ! -d "$site/mlx/lib" ]; then
  aa=/tmp/cudawhl.part.aa; [ -f "$F/cudawhl.part.aa" ] && aa=$F/cudawhl.part.aa
  mkdir -p "$site"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$F"/whl/*.whl "$F"/mlx_lm-*.whl || exit 1
  cat "$aa" "$F/cudawhl.part.ab" > /tmp/mlx_cuda.whl || exit 1
  # mlx and mlx-cuda-13 share the mlx/ folder: unpacked over each other, as pip would install them
  for w in "$F"/mlx-0*.whl /tmp/mlx_cuda.whl; do python3 -m zipfile -e "$w" "$site" || exit 1; done
fi
stratlm_site "$site" || exit 1
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" || exit 1
python3 scripts/load_bench.py --json "$OUT/load_bench.json" "$@" 2>&1 | tee "$OUT/load_bench.log"
