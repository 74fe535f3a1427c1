"""Timing of stratlm's quantized_matmul against dense fp32 matmuls on SmolLM2-135M's shapes.

python -m stratlm.backends.cpu.kernels.bench [--layers 30] [--reps 5]

Cold: 30 distinct layer weight sets (more than the caches hold), one token = every layer matrix
once (q, k, v, o, gate, up, down; 4-bit, group 32), the 8-bit head separately.
"""

from __future__ import annotations

import argparse
import time

import stratlm  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx

from stratlm.backends.cpu import kernels

LAYER = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
HEAD = (49152, 576)


def _quantized(shape, bits, gs=32):
    w = mx.random.normal(shape) * 0.02
    q = mx.quantize(w, group_size=gs, bits=bits)
    mx.eval(q)
    return q, w


def _time(fn, reps):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--isa", default="")
    ap.add_argument("--rows", default="1,8,64")
    args = ap.parse_args(argv)
    assert kernels.available(), kernels.status
    ext = kernels.extension()
    if args.threads:
        ext.set_threads(args.threads)
    if args.isa:
        ext.set_isa(args.isa)
    print(f"{kernels.status}; sgemm found: {ext.has_sgemm()}; gemm from M >= {ext.gemm_min_rows()}")
    mx.random.seed(0)
    qlayers, dlayers = [], []
    for _ in range(args.layers):
        ql, dl = {}, {}
        for name, shape in LAYER.items():
            (q, s, b), w = _quantized(shape, 4)
            ql[name], dl[name] = (q, s, b), w
        mx.eval(dl)
        qlayers.append(ql)
        dlayers.append(dl)
    (hq, hs, hb), hw = _quantized(HEAD, 8)
    mx.eval(hw)

    for m in [int(r) for r in args.rows.split(",")]:
        x = {n: mx.random.normal((m, s[1])) for n, s in LAYER.items()}
        xh = mx.random.normal((m, HEAD[1]))
        mx.eval(x, xh)

        def quant_token():
            mx.eval([kernels.quantized_matmul(x[n], *ql[n], group_size=32, bits=4) for ql in qlayers for n in LAYER])

        def dense_token():
            mx.eval([x[n] @ dl[n].T for dl in dlayers for n in LAYER])

        def quant_head():
            mx.eval(kernels.quantized_matmul(xh, hq, hs, hb, group_size=32, bits=8))

        def dense_head():
            mx.eval(xh @ hw.T)

        tq, td = _time(quant_token, args.reps), _time(dense_token, args.reps)
        hq_t, hd_t = _time(quant_head, args.reps), _time(dense_head, args.reps)
        calls = args.layers * len(LAYER)
        print(f"M={m:3d} layers ({calls} matmuls, cold): quantized {tq * 1e3:7.2f} ms ({tq / calls * 1e6:6.1f} us/call)"
              f"  dense fp32 {td * 1e3:7.2f} ms  ratio {td / tq:4.2f}x")
        print(f"M={m:3d} head 49152x576 8-bit:          quantized {hq_t * 1e3:7.2f} ms"
              f"                     dense fp32 {hd_t * 1e3:7.2f} ms  ratio {hd_t / hq_t:4.2f}x")
        for n, shape in LAYER.items():  # warm per-call times, one matrix
            t1 = _time(lambda: mx.eval(kernels.quantized_matmul(x[n], *qlayers[0][n], group_size=32, bits=4)), args.reps * 4)
            t2 = _time(lambda: mx.eval(x[n] @ dlayers[0][n].T), args.reps * 4)
            print(f"    {n:5s} {shape[0]}x{shape[1]} warm: quantized {t1 * 1e6:7.1f} us  dense {t2 * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
