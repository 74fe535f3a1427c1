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
python3 - "$site" <<'PY' || exit 1
import pathlib, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
info = pathlib.Path(sys.argv[1]) / f"stratlm-{project['version']}.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: stratlm\nVersion: {project['version']}\n")
groups = project["entry-points"]
(info / "entry_points.txt").write_text("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for g, eps in groups.items()))
PY
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" || exit 1
python3 scripts/load_bench.py --json "$OUT/load_bench.json" "$@" 2>&1 | tee "$OUT/load_bench.log"
