"""A benchmark engine in its own process, so it can run with another BLAS than ours.

`python -m stratlm.bench.worker FOLDER` loads mlx-lm on the model folder, then answers one
JSON line per request line ({"prompt": [...], "max_tokens": n, "batch": b}). The BLAS is
chosen by the environment it is started with (STRATLM_BLAS=off: MLX's bundled BLAS, what
a user who installs mlx-lm gets; STRATLM_BLAS_GEMV=off: plain OpenBLAS).
"""

from __future__ import annotations

import json
import sys

import stratlm  # noqa: F401  (first: the BLAS the environment asks for, before mlx.core)


def main(argv: list[str]) -> int:
    import attrs

    from stratlm.bench.engines import MlxLmEngine
    from stratlm.backends.cpu.blas import status

    engine = MlxLmEngine(argv[0])
    print(json.dumps({"ready": True, "blas": status["library"], "gemv_routing": status["gemv_routing"]}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        measurement = engine.run(request["prompt"], request["max_tokens"], request.get("batch", 1))
        print(json.dumps(attrs.asdict(measurement)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
