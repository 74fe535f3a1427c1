"""The scheduler's load benchmark on the GPU (issue 14): `stratlm bench --load` on the Qwen3-0.6B
shape (random bf16 weights) at 64 and 256 concurrent rows, Poisson arrivals, against mlx-lm's
BatchGenerator and our static batch. Run through scripts/gpu_bench.sh:
    GPU_SCRIPT=scripts/gpu_load_bench.py bash scripts/gpu_bench.sh
"""

import sys

from stratlm.cli.main import main

RUNS = [
    ["--load", "256", "--concurrency", "64", "--rate", "100", "--history-tokens", "2000"],
    ["--load", "512", "--concurrency", "256", "--rate", "400", "--history-tokens", "0"],
]

# arguments: which runs (0, 1); none: all
for extra in [RUNS[int(i)] for i in sys.argv[1:]] or RUNS:
    print(" ".join(["stratlm bench -m qwen3-0.6b-random --prompt-tokens 128 --max-tokens 128", *extra]), flush=True)
    code = main(["bench", "-m", "qwen3-0.6b-random", "--prompt-tokens", "128", "--max-tokens", "128", *extra])
    if code:
        sys.exit(code)
